"""Generation backends: one module each; a backend never imports another backend."""
