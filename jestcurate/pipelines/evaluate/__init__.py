"""`jestcurate eval`: train one recipe on the uniform pool and on each selection, and compare
them on evaluation sets (config, streams, units, results, job; sets reads the evaluation sets)."""
