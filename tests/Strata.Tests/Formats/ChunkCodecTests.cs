using System.Security.Cryptography;
using System.Text;
using Strata.Formats.Chunks;

namespace Strata.Tests.Formats;

/// <summary>The chunk repository's pure codecs: config, blob envelope, keys, point index.</summary>
public class ChunkCodecTests
{
    private static byte[] Random(int size, int seed)
    {
        var b = new byte[size];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static byte[] Compressible(int size)
    {
        var b = new byte[size];
        for (int i = 0; i < size; i++) b[i] = (byte)(i / 512 % 7);
        return b;
    }

    private static readonly byte[] Key = Random(32, 99);
    private static readonly byte[] Nonce = Random(12, 98);
    private static readonly byte[] Context = Random(32, 97);

    // ------------------------------------------------------------------ blob

    [Theory]
    [InlineData(true, true)]
    [InlineData(true, false)]
    [InlineData(false, true)]
    [InlineData(false, false)]
    public void ABlobRoundTripsAndCompressesOnlyWhenThatIsSmaller(bool compressible, bool encrypted)
    {
        byte[] plain = compressible ? Compressible(65536) : Random(65536, 1);
        byte[] key = encrypted ? Key : [];
        byte[] blob = ChunkBlob.Encode(ChunkBlob.ChunkMagic, plain, key, Context, encrypted ? Nonce : default);
        Assert.Equal("STCK"u8.ToArray(), blob[..4]);
        Assert.Equal(ChunkBlob.Version, blob[4]);
        Assert.Equal((compressible ? ChunkBlob.FlagZstd : 0) | (encrypted ? ChunkBlob.FlagEncrypted : 0), blob[5]);
        if (compressible) Assert.True(blob.Length < plain.Length / 4);
        else Assert.Equal(ChunkBlob.HeaderSize + plain.Length + (encrypted ? 28 : 0), blob.Length);
        Assert.Equal(plain, ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, key, Context, 65536));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AnEncryptedBlobWithAnyByteFlippedFailsToOpen(bool compressible)
    {
        byte[] plain = compressible ? Compressible(8192) : Random(8192, 2);
        byte[] blob = ChunkBlob.Encode(ChunkBlob.ChunkMagic, plain, Key, Context, Nonce);
        for (int i = 0; i < blob.Length; i++)
        {
            blob[i] ^= 0x01;
            Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, Key, Context, 8192));
            blob[i] ^= 0x01;
        }
        Assert.Equal(plain, ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, Key, Context, 8192));
    }

    [Fact]
    public void AnEncryptedBlobOpensOnlyUnderItsOwnNameAndKey()
    {
        byte[] blob = ChunkBlob.Encode(ChunkBlob.ChunkMagic, Random(4096, 3), Key, Context, Nonce);
        var moved = Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, Key, Random(32, 5), 4096));
        Assert.Contains("authentication", moved.Message);
        Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, Random(32, 6), Context, 4096));
        // Read as unencrypted, or as another kind of blob: refused before any decoding.
        Assert.Contains("encrypted but the repository is not", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, [], Context, 4096)).Message);
        Assert.Contains("bad magic", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.PointIndexMagic, blob, Key, Context, 4096)).Message);
    }

    [Fact]
    public void AnUnencryptedBlobIsRefusedByAnEncryptedRepositoryAndBadHeadersAreNamed()
    {
        byte[] blob = ChunkBlob.Encode(ChunkBlob.ChunkMagic, Compressible(4096), [], Context, default);
        Assert.Contains("not encrypted but the repository is", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, Key, Context, 4096)).Message);
        var badVersion = (byte[])blob.Clone();
        badVersion[4] = 9;
        Assert.Contains("version 9", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, badVersion, [], Context, 4096)).Message);
        var badFlags = (byte[])blob.Clone();
        badFlags[5] |= 0x80;
        Assert.Contains("flags", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, badFlags, [], Context, 4096)).Message);
        Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob.AsSpan(0, 3), [], Context, 4096));
        // A frame promising more than a chunk is refused before it is inflated.
        Assert.Contains("more than", Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, [], Context, 1024)).Message);
        // A damaged zstd frame is a format error, not a crash.
        var badFrame = (byte[])blob.Clone();
        for (int i = ChunkBlob.HeaderSize; i < badFrame.Length; i++) badFrame[i] = 0xff;
        Assert.Throws<ChunkFormatException>(() => ChunkBlob.Decode(ChunkBlob.ChunkMagic, badFrame, [], Context, 4096));
    }

    // ------------------------------------------------------------------ keys

    [Fact]
    public void ChunkIdsAreHmacSha256UnderTheIdKeyAndZeroChunksAreRecognised()
    {
        byte[] data = Random(10000, 7);
        var id = new byte[32];
        ChunkKeys.ChunkId(Key, data, id);
        Assert.Equal(HMACSHA256.HashData(Key, data), id);
        ChunkKeys.ChunkId(Random(32, 8), data, id);
        Assert.NotEqual(HMACSHA256.HashData(Key, data), id);
        Assert.True(ChunkKeys.IsAllZero(new byte[4096]));
        var almost = new byte[4096];
        almost[4095] = 1;
        Assert.False(ChunkKeys.IsAllZero(almost));
    }

    [Fact]
    public void KeysWrappedUnderAPassphraseOpenWithItAndNotWithAnother()
    {
        byte[] salt = Random(16, 10), keys = Random(64, 11);
        byte[] kek = ChunkKeys.DeriveKek("correct horse"u8, salt, 8192, 2, 1);
        Assert.Equal(kek, ChunkKeys.DeriveKek("correct horse"u8, salt, 8192, 2, 1));
        Assert.NotEqual(kek, ChunkKeys.DeriveKek("correct horse"u8, Random(16, 12), 8192, 2, 1));
        Assert.NotEqual(kek, ChunkKeys.DeriveKek("correct horse"u8, salt, 8192, 3, 1));
        byte[] wrapped = ChunkKeys.Wrap(kek, keys, Nonce);
        Assert.Equal(ChunkKeys.WrappedSize, wrapped.Length);
        Assert.Equal(keys, ChunkKeys.Unwrap(kek, wrapped));
        byte[] wrong = ChunkKeys.DeriveKek("battery staple"u8, salt, 8192, 2, 1);
        Assert.Contains("wrong passphrase or key file", Assert.Throws<ChunkKeyException>(() => ChunkKeys.Unwrap(wrong, wrapped)).Message);
        for (int i = 0; i < wrapped.Length; i++)
        {
            wrapped[i] ^= 0x40;
            Assert.Throws<ChunkKeyException>(() => ChunkKeys.Unwrap(kek, wrapped));
            wrapped[i] ^= 0x40;
        }
    }

    [Fact]
    public void KdfParametersOutsideWhatLibsodiumRunsAreRefused()
    {
        Assert.Contains("parallelism", Assert.Throws<ChunkFormatException>(() => ChunkKeys.DeriveKek("x"u8, Random(16, 1), 8192, 2, 4)).Message);
        Assert.Throws<ChunkFormatException>(() => ChunkKeys.DeriveKek("x"u8, Random(16, 1), 1, 2, 1));
        Assert.Throws<ChunkFormatException>(() => ChunkKeys.DeriveKek("x"u8, Random(16, 1), 8192, 0, 1));
        Assert.Throws<ChunkFormatException>(() => ChunkKeys.DeriveKek("x"u8, Random(8, 1), 8192, 2, 1));
    }

    // ------------------------------------------------------------------ config

    private static ChunkRepositoryConfig Plain() => new()
    {
        Tag = "0a1b2c3d",
        ChunkSize = 1 << 22,
        Created = new DateTimeOffset(2026, 12, 6, 12, 0, 0, TimeSpan.Zero),
        IdKey = Random(32, 20),
    };

    [Fact]
    public void TheConfigRoundTripsAsKebabCaseJson()
    {
        var plain = Plain();
        string json = Encoding.UTF8.GetString(plain.Serialize());
        Assert.Contains("\"kind\":\"strata-chunks\"", json);
        Assert.Contains("\"chunk-size\":4194304", json);
        Assert.Contains("\"id-key\":", json);
        Assert.DoesNotContain("encryption", json);
        var back = ChunkRepositoryConfig.Parse(plain.Serialize());
        Assert.Equal(plain.Tag, back.Tag);
        Assert.Equal(plain.ChunkSize, back.ChunkSize);
        Assert.Equal(plain.IdKey, back.IdKey);
        Assert.Equal(plain.Created, back.Created);

        var encrypted = plain with
        {
            IdKey = null,
            Encryption = new ChunkEncryptionConfig { Salt = Random(16, 21), MemoryKib = 65536, Iterations = 3, Parallelism = 1, WrappedKeys = Random(92, 22) },
        };
        json = Encoding.UTF8.GetString(encrypted.Serialize());
        Assert.Contains("\"memory-kib\":65536", json);
        Assert.Contains("\"wrapped-keys\":", json);
        Assert.DoesNotContain("id-key", json);
        var e = ChunkRepositoryConfig.Parse(encrypted.Serialize()).Encryption!;
        Assert.Equal(encrypted.Encryption.WrappedKeys, e.WrappedKeys);
        Assert.Equal(encrypted.Encryption.Salt, e.Salt);
        Assert.Equal("argon2id", e.Kdf);
    }

    [Theory]
    [InlineData("not json", "not valid JSON")]
    [InlineData("{\"format\":1,\"kind\":\"strata-repository\",\"tag\":\"0a1b2c3d\",\"chunk-size\":4194304}", "kind")]
    [InlineData("{\"format\":2,\"kind\":\"strata-chunks\",\"tag\":\"0a1b2c3d\",\"chunk-size\":4194304}", "format 2")]
    [InlineData("{\"format\":1,\"kind\":\"strata-chunks\",\"tag\":\"0a1b2c3d\",\"chunk-size\":5000000,\"id-key\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"}", "chunk size")]
    [InlineData("{\"format\":1,\"kind\":\"strata-chunks\",\"tag\":\"0a1b2c3d\",\"chunk-size\":4194304,\"compression\":\"zstd\"}", "id key")]
    [InlineData("{\"format\":1,\"kind\":\"strata-chunks\",\"tag\":\"xyz\",\"chunk-size\":4194304,\"id-key\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"}", "tag")]
    [InlineData("{\"format\":1,\"kind\":\"strata-chunks\",\"tag\":\"0a1b2c3d\",\"chunk-size\":4194304,\"compression\":\"lz4\",\"id-key\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"}", "compression")]
    public void AConfigThisVersionCannotReadSafelyIsRefusedWithTheReason(string json, string reason)
    {
        var e = Assert.Throws<ChunkFormatException>(() => ChunkRepositoryConfig.Parse(Encoding.UTF8.GetBytes(json)));
        Assert.Contains(reason, e.Message);
    }

    // ------------------------------------------------------------------ point index

    private static (PointIndexHeader, byte[][]) SamplePoint()
    {
        var header = new PointIndexHeader
        {
            Id = "20261206T120000Z",
            Time = new DateTimeOffset(2026, 12, 6, 12, 0, 0, TimeSpan.Zero),
            ChunkSize = 65536,
            Disks =
            [
                new PointIndexDisk { Disk = "vda", VirtualSize = 3 * 65536 + 100, Level = "full", Mode = "push", Source = "unix:/q", Node = "n0", Bitmap = "strata-0a1b2c3d-20261206T120000Z", ChunkCount = 4, CopiedBytes = 5, UploadedBytes = 6, UploadedChunks = 3 },
                new PointIndexDisk { Disk = "vdb", VirtualSize = 65536, Level = "inc", Parent = "20261205T120000Z", Mode = "pull", Source = "unix:/q", Node = "n1", Bitmap = "b", Note = "n", ChunkCount = 1 },
            ],
        };
        return (header, [Random(4 * 32, 30), new byte[32]]);
    }

    [Fact]
    public void APointIndexRoundTrips()
    {
        var (header, tables) = SamplePoint();
        byte[] body = PointIndexCodec.Encode(header, tables.Select(t => (ReadOnlyMemory<byte>)t).ToList());
        var (back, backTables) = PointIndexCodec.Decode(body);
        Assert.Equal(header.Id, back.Id);
        Assert.Equal(header.Time, back.Time);
        Assert.Equal(header.Disks, back.Disks);
        Assert.Equal(tables, backTables);
        Assert.Contains("\"virtual-size\":196708", Encoding.UTF8.GetString(body));
    }

    [Fact]
    public void APointIndexWithAnyByteFlippedIsRefused()
    {
        var (header, tables) = SamplePoint();
        byte[] body = PointIndexCodec.Encode(header, tables.Select(t => (ReadOnlyMemory<byte>)t).ToList());
        for (int i = 0; i < body.Length; i++)
        {
            body[i] ^= 0x10;
            Assert.Contains("SHA-256", Assert.Throws<ChunkFormatException>(() => PointIndexCodec.Decode(body)).Message);
            body[i] ^= 0x10;
        }
        Assert.Throws<ChunkFormatException>(() => PointIndexCodec.Decode(body.AsSpan(0, body.Length - 1)));
    }

    [Fact]
    public void APointIndexWhoseTablesDoNotMatchItsDisksIsRefused()
    {
        var (header, tables) = SamplePoint();
        Assert.Throws<ArgumentException>(() => PointIndexCodec.Encode(header, [tables[0], new byte[64]]));
        // A consistent hash over an inconsistent body (written by something else): the table lengths are checked too.
        var lying = header with { Disks = [header.Disks[0] with { ChunkCount = 5 }, header.Disks[1]] };
        byte[] json = System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(lying, ChunkJson.Default.PointIndexHeader);
        var body = new byte[4 + json.Length + 5 * 32 + 32 + 32];
        BitConverter.TryWriteBytes(body.AsSpan(0, 4), json.Length);
        json.CopyTo(body, 4);
        SHA256.HashData(body.AsSpan(0, body.Length - 32), body.AsSpan(body.Length - 32));
        Assert.Contains("chunks for", Assert.Throws<ChunkFormatException>(() => PointIndexCodec.Decode(body)).Message);
    }
}
