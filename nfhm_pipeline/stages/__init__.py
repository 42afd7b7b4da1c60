"""Pipeline stages as plain functions: catalog entry in, tables and files out.

Each stage is what one asset does, minus Dagster: the asset reads its inputs,
calls one function here and records metadata. Usable from a notebook.
"""
