using Strata.Backup.Chunks;
using Strata.Tests.Block;

namespace Strata.Tests.Backup;

/// <summary>A folder store's listing while other processes put and delete under the same prefix (leases come and
/// go while a GC lists them): an object deleted mid-walk is left out, never an error.</summary>
public class FolderObjectStoreListingTests
{
    [Fact]
    public async Task ListingWhileObjectsComeAndGoNeverFails()
    {
        using var dir = new TempDir();
        var store = new FolderObjectStore(dir["store"]);
        for (int i = 0; i < 200; i++) await store.PutAsync($"locks/shared/keep{i:D3}", new byte[1]);
        using var stop = new CancellationTokenSource();
        // Created through a plain file write (a put also fsyncs, which would make the churn too slow to meet the walk).
        var churn = Task.WhenAll(Enumerable.Range(0, 3).Select(t => Task.Run(() =>
        {
            for (int i = 0; !stop.IsCancellationRequested; i++)
            {
                string path = Path.Combine(store.Root, "locks", "shared", $"churn{t}-{i % 50:D2}");
                File.WriteAllBytes(path, new byte[8]);
                File.Delete(path);
            }
        })));
        try
        {
            for (int round = 0; round < 1000; round++)
            {
                int kept = 0;
                await foreach (var o in store.ListAsync("locks/shared/"))
                    if (o.Key.Contains("/keep", StringComparison.Ordinal)) kept++;
                Assert.Equal(200, kept);
            }
        }
        finally
        {
            await stop.CancelAsync();
            await churn;
        }
    }
}
