"""Our own model forwards (paged, tree-aware attention) and their weight loaders."""
