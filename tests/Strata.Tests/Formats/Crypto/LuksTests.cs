using System.Security.Cryptography;
using Strata.Formats.Crypto;

namespace Strata.Tests.Formats.Crypto;

public class LuksTests
{
    [Theory]
    [InlineData(64)]
    [InlineData(48)] // not a whole number of SHA-256 digests: the last diffused piece is short
    [InlineData(16)]
    public void AfSplitMergeRoundTrips(int keyLength)
    {
        var key = RandomNumberGenerator.GetBytes(keyLength);
        var split = new byte[keyLength * Luks.Stripes];
        AfSplitter.Split(key, Luks.Stripes, HashAlgorithmName.SHA256, split);
        Assert.Equal(key, AfSplitter.Merge(split, keyLength, Luks.Stripes, HashAlgorithmName.SHA256));
        // Any one damaged stripe loses the key.
        split[keyLength * 1234] ^= 1;
        Assert.NotEqual(key, AfSplitter.Merge(split, keyLength, Luks.Stripes, HashAlgorithmName.SHA256));
    }

    [Fact]
    public void HeaderRoundTripsAndKeepsQemuLayout()
    {
        var (header, area, _) = Luks.Format("pw"u8, new LuksFormatOptions { IterTimeMs = 1 });
        var parsed = LuksHeader.Parse(area);
        Assert.Equal(header.Encode(), parsed.Encode());
        Assert.Equal("aes", parsed.CipherName);
        Assert.Equal("xts-plain64", parsed.CipherMode);
        Assert.Equal("sha256", parsed.HashSpec);
        Assert.Equal(64u, parsed.KeyBytes);
        // QEMU's layout for a 64-byte key: slots 4 KiB aligned after the header, payload after the eighth.
        Assert.Equal([8u, 512u, 1016u, 1520u, 2024u, 2528u, 3032u, 3536u], parsed.KeySlots.Select(s => s.KeyMaterialOffsetSectors));
        Assert.Equal(2068480u / 512, parsed.PayloadOffsetSectors);
        Assert.Equal(2068480, area.Length);
        Assert.True(parsed.KeySlots[0].Active);
        Assert.All(parsed.KeySlots.Skip(1), s => Assert.False(s.Active));
        Assert.True(parsed.KeySlots[0].Iterations >= Luks.MinIterations && parsed.MasterKeyDigestIterations >= Luks.MinIterations);
        Assert.True(Guid.TryParse(parsed.Uuid, out _));
    }

    [Fact]
    public void ParseRefusesWhatIsNotLuks1()
    {
        var e = Assert.Throws<FormatException>(() => LuksHeader.Parse(new byte[LuksHeader.Length]));
        Assert.Equal("Volume is not in LUKS format", e.Message);
        var (_, area, _) = Luks.Format("pw"u8, new LuksFormatOptions { IterTimeMs = 1 });
        area[7] = 2;
        Assert.Equal("Unsupported LUKS version 2", Assert.Throws<FormatException>(() => LuksHeader.Parse(area)).Message);
    }

    [Theory]
    [InlineData("aes-256", "xts", 64)]
    [InlineData("aes-128", "xts", 32)]
    [InlineData("aes-256", "cbc", 32)]
    public void UnlockGivesTheMasterKeyOnlyForThePassword(string alg, string mode, int keyBytes)
    {
        var (header, area, masterKey) = Luks.Format("astrochicken"u8, new LuksFormatOptions { CipherAlg = alg, CipherMode = mode, IterTimeMs = 1 });
        Assert.Equal(keyBytes, masterKey.Length);
        Assert.Equal(masterKey, Luks.Unlock(header, area, "astrochicken"u8));
        Assert.Null(Luks.Unlock(header, area, "platypus"u8));
        Assert.Equal(alg, Luks.CipherAlg(header));
    }
}
