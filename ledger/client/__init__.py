"""What callers hold: the typed API over Ray (`over_ray.LedgerClient`), over HTTP
(`over_http.HttpLedger`), in one process (`inprocess`, `fake`), the lease holder of an ingress
replica (`holder.LeaseHolder`), and launch/attach (`service`). serve_app and ui reach these only
through the `ledger` package root.
"""
