"""A report's way in: UDP batches, the codec, intake and dedup, the journal, the store,
the receiver, and event files for replay; the C helpers beside them."""
