"""Reports: tables and figures derived from a sweep journal."""
