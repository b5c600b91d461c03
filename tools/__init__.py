"""Offline tools: commands that prepare a run from a trained model and shards, and never train (`plan_batches`:
`tessera plan-batches`). They use the models, the data and the embedding code of `tessera.eval`; nothing here imports
the training runtime."""
