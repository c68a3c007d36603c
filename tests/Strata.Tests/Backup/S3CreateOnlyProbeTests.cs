using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Strata.Backup.Chunks;

namespace Strata.Tests.Backup;

/// <summary>
/// The create-only probe refuses S3 servers that do not enforce <c>If-None-Match: *</c>: a minimal S3 server on
/// loopback that either ignores the header (as s3rver does) or answers 501 (as Swift's s3api does). The probe passing
/// on radosgw is checked by the interop contract tests.
/// </summary>
public sealed class S3CreateOnlyProbeTests : IDisposable
{
    private readonly HttpListener _listener = new();
    private readonly ConcurrentDictionary<string, byte[]> _objects = new();
    private readonly Task _serving;
    private bool _conditionalPutNotImplemented;

    public S3CreateOnlyProbeTests()
    {
        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            Endpoint = $"http://127.0.0.1:{((IPEndPoint)probe.LocalEndpoint).Port}/";
        }
        _listener.Prefixes.Add(Endpoint);
        _listener.Start();
        _serving = Task.Run(ServeAsync);
    }

    private string Endpoint { get; }

    private S3ObjectStore Store() => new(new S3Connection(Endpoint.TrimEnd('/'), "us-east-1", "key", "secret"), "bucket", "repo");

    /// <summary>PUT stores whatever it gets and ignores conditions (or refuses them with 501), GET/DELETE by path.</summary>
    private async Task ServeAsync()
    {
        while (_listener.IsListening)
        {
            HttpListenerContext context;
            try { context = await _listener.GetContextAsync(); }
            catch (Exception e) when (e is HttpListenerException or ObjectDisposedException) { return; }
            var request = context.Request;
            var response = context.Response;
            string path = request.Url!.AbsolutePath;
            if (request.HttpMethod == "PUT" && request.Headers["If-None-Match"] is not null && _conditionalPutNotImplemented)
            {
                await Reply(response, 501, "<Error><Code>NotImplemented</Code><Message>conditional writes</Message></Error>");
            }
            else if (request.HttpMethod == "PUT")
            {
                using var body = new MemoryStream();
                await request.InputStream.CopyToAsync(body);
                _objects[path] = body.ToArray();
                response.AddHeader("ETag", "\"0123456789abcdef0123456789abcdef\"");
                await Reply(response, 200, "");
            }
            else if (request.HttpMethod == "GET" && _objects.TryGetValue(path, out var stored))
            {
                response.StatusCode = 200;
                response.ContentLength64 = stored.Length;
                await response.OutputStream.WriteAsync(stored);
                response.Close();
            }
            else if (request.HttpMethod == "DELETE")
            {
                _objects.TryRemove(path, out _);
                await Reply(response, 204, "");
            }
            else
            {
                await Reply(response, 404, "<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>");
            }
        }
    }

    private static async Task Reply(HttpListenerResponse response, int status, string xml)
    {
        response.StatusCode = status;
        var bytes = Encoding.UTF8.GetBytes(xml);
        if (bytes.Length > 0) response.ContentType = "application/xml";
        response.ContentLength64 = bytes.Length;
        await response.OutputStream.WriteAsync(bytes);
        response.Close();
    }

    [Fact]
    public async Task AServerThatIgnoresIfNoneMatchIsRefused()
    {
        using var store = Store();
        var e = await Assert.ThrowsAsync<ObjectStoreException>(() => store.ProbeCreateOnlyAsync());
        Assert.Contains("does not enforce create-only PUT (If-None-Match: *): it accepted a second write of one key", e.Message);
        Assert.Contains($"s3://bucket/repo at {Endpoint.TrimEnd('/')}", e.Message);
        // The probe cleans up after itself even when it refuses.
        Assert.Empty(_objects);
    }

    [Fact]
    public async Task AServerThatRejectsIfNoneMatchIsRefused()
    {
        _conditionalPutNotImplemented = true;
        using var store = Store();
        var e = await Assert.ThrowsAsync<ObjectStoreException>(() => store.ProbeCreateOnlyAsync());
        Assert.Contains("does not support create-only PUT (If-None-Match: *)", e.Message);
        // Plain writes still work on such a server: the refusal comes from the probe, not a broken connection.
        await store.PutAsync("config", "c"u8.ToArray());
        Assert.Equal("c"u8.ToArray(), await store.GetAsync("config"));
    }

    public void Dispose()
    {
        _listener.Stop();
        _listener.Close();
        _serving.Wait(TimeSpan.FromSeconds(5));
    }
}
