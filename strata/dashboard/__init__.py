"""`strata dashboard`: a read-only web console (reader: the fleet as JSON; app: HTTP, SSE, the page)."""
