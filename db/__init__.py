"""Database access: the pool, the SQL loader, migrations, one module per table group."""
