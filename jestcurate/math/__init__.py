"""Pure math on embeddings: contrastive scores and the joint sampler. Arrays in, arrays out;
no I/O."""
