using System.Globalization;

namespace Strata.Cli.Img;

/// <summary>Sizes as qemu-img reads and prints them.</summary>
internal static class SizeText
{
    private static readonly string[] Units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

    /// <summary>Parses "64M", "1.5G", "1000" (bytes), "0x10000", with k/K, M, G, T, P, E binary suffixes and an optional B.</summary>
    public static bool TryParse(string text, out long bytes)
    {
        bytes = 0;
        if (string.IsNullOrEmpty(text)) return false;
        // qemu_strtosz also takes a plain hexadecimal byte count ("cluster_size=0x10000").
        if (text.Length > 2 && text[0] == '0' && (text[1] is 'x' or 'X'))
            return long.TryParse(text.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out bytes) && bytes >= 0;
        int end = 0;
        while (end < text.Length && (char.IsAsciiDigit(text[end]) || text[end] == '.')) end++;
        if (end == 0) return false;
        if (!double.TryParse(text.AsSpan(0, end), NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value)) return false;
        string suffix = text[end..];
        int shift = suffix.ToUpperInvariant() switch
        {
            "" or "B" => 0,
            "K" or "KB" or "KIB" => 10,
            "M" or "MB" or "MIB" => 20,
            "G" or "GB" or "GIB" => 30,
            "T" or "TB" or "TIB" => 40,
            "P" or "PB" or "PIB" => 50,
            "E" or "EB" or "EIB" => 60,
            _ => -1,
        };
        if (shift < 0) return false;
        double result = value * Math.Pow(2, shift);
        if (result >= 9.2233720368547758e18 || (shift == 0 && text.Contains('.'))) return false;
        bytes = (long)result;
        return true;
    }

    /// <summary>qemu's size_to_str: the unit switches once the value reaches 1000 of the smaller one, and the number
    /// has three significant digits ("1.32 MiB", "196 KiB", "0.977 MiB").</summary>
    public static string Human(long bytes)
    {
        if (bytes <= 0) return "0 B";
        double scaled = bytes / (1000.0 / 1024.0);
        int exponent = (int)Math.Floor(Math.Log2(scaled)) + 1; // frexp's exponent
        int unit = Math.Clamp((exponent - 1) / 10, 0, Units.Length - 1);
        double v = bytes / Math.Pow(2, 10 * unit);
        string number = v.ToString("G3", CultureInfo.InvariantCulture).Replace("E+", "e+", StringComparison.Ordinal);
        return $"{number} {Units[unit]}";
    }

    public static string Hex(long value) => value == 0 ? "0" : "0x" + value.ToString("x", CultureInfo.InvariantCulture);
}
