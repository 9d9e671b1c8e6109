"""Pure-Python helpers of the MRSISuperResolution Slicer module.

Everything here except ``mrml`` imports neither ``slicer`` nor Qt nor torch, so it runs under plain pytest;
``mrml`` needs only Slicer's MRML libraries (the Slicer application or the ``slicer-core`` wheel).
"""
