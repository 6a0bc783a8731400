"""Reading and writing the formats of other projects' checkpoints."""
