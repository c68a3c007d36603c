using BenchmarkDotNet.Running;

// dotnet run -c Release --project bench/Strata.Benchmarks -- --filter '*'
BenchmarkSwitcher.FromAssembly(typeof(Strata.Benchmarks.Qcow2Benchmarks).Assembly).Run(args);
