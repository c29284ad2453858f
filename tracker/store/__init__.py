"""Everything that knows how tracker sits in Redis: key names (``keys``), settings and
the clients built from them (``settings``, ``connection``), the deployment every
service takes (``deployment``), the embedded server (``embedded``), the Lua scripts
and their invoker (``scripts`` and ``lua/``), paged stream reads (``streams``) and
the one translation of Redis errors into tracker's (``boundary``)."""
