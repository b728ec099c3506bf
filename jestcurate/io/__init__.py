"""On-disk formats and input reading: shard listing, the tar reader, the score-set store, the
row cache, remote storage."""
