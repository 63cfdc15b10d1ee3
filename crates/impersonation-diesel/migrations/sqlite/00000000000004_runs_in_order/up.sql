-- Audit pages read a view's runs in (first_us, chain, first_seq) order.
-- With the whole order in the index, a page's LIMIT stops the scan early,
-- where the index on (view_name, view_key, first_us) alone had the rest
-- of the order sorted after the fact.
CREATE INDEX impersonation_audit_runs_in_order
    ON impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq);
DROP INDEX impersonation_audit_runs_by_view;
