"""The bundled demo model `parts@1`: a synthetic factory-parts dataset, its training script, its weights."""
