"""The embedded model stack: enhancer (issue 4); VAE, DiT and reward heads arrive with issue 5."""
