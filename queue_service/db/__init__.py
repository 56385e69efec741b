"""Persistence of the live service: PostgreSQL schema, engine, migrations, embedded server.

`tables` declares the schema, `migrate` builds it, `engine` connects to it and
translates refused writes into project errors, `embedded` starts a local server
when no DATABASE_URL is given.
"""
