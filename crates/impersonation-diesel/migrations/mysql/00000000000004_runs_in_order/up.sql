-- Audit pages read a view's runs in (first_us, chain, first_seq) order.
-- InnoDB adds a table's primary key to each of its other indexes, so with
-- this key the view index (view_name, view_key, first_us) holds the whole
-- order, and a page's LIMIT stops the scan early instead of sorting every
-- run in range first. (A run is one chain's events from first_seq on, in
-- one view: the key is unique. Servers that set sql_require_primary_key
-- want one too.) Rebuilds the table: writes wait meanwhile.
ALTER TABLE impersonation_audit_runs
    ADD PRIMARY KEY (view_name, view_key, chain, first_seq);
