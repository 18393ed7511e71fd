"""PPDB publication: HATS catalogs (hats_export), their verification (verify) and restore (restore)."""
