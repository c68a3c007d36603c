using BenchmarkDotNet.Running;

// dotnet run -c Release --project bench/Strata.Benchmarks -- --filter '*'
// dotnet run -c Release --project bench/Strata.Benchmarks -- nbd-random-writes SOCKET EXPORT SECONDS QUEUE SPAN
if (args.Length > 0 && args[0] == "nbd-random-writes") return await Strata.Benchmarks.NbdRandomWrites.RunAsync(args[1..]);
BenchmarkSwitcher.FromAssembly(typeof(Strata.Benchmarks.Qcow2Benchmarks).Assembly).Run(args);
return 0;
