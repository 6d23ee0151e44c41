"""One module per CLI verb: argument parsing and printing only; the work is a library call."""
