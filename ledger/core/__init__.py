"""The ledger's pure core: values, rules, the quota book, the typed API and its wire form.

No Ray, no database, no network: everything here runs in any process and in unit tests. The
layers above (`ledger.store`, `ledger.shard`, `ledger.client`, `ledger.cli`) import from here,
never the other way round (the `ledger-layers` contract in pyproject.toml).
"""
