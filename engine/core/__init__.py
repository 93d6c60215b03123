"""What every layer shares and nothing in the engine is needed for: errors, the per-mille sparsity and width
vocabulary, process groups and faults, atomic outputs, progress lines, trackers, local Hub folders and provenance."""
