"""nn.Modules, one concept per file."""
