"""The training engine: the step, its fast paths, the trainer that loops over epochs, and the run they make."""
