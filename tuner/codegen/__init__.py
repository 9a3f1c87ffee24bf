"""Code generation: renders templates/ into one Triton module per specialization (needs jinja2)."""
