"""Pure planning: which bytes each rank writes or reads.  No I/O and no collectives."""
