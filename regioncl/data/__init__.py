"""Image sources, the embedded dataset, and WebDataset shards."""
