"""What the engines share: public helpers no engine owns (row packing, chunk membership, names).

An engine package may import from here and from :mod:`diadb.backends.base`; never from another
engine's package.
"""
