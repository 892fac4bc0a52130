"""Federation: the Flower ServerApp/ClientApp pair, the strategy base with fedlt's hooks, and the backends
that run them (Ray simulation on this machine or on a Ray cluster)."""
