-- Nothing to undo: the runs table has had its primary key since migration
-- 2 (or 3, for a table an earlier migration 2 made without it), and a
-- server that requires keys would refuse to drop it.
DO 0;
