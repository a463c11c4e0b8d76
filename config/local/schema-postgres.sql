-- The PostgreSQL demo's tables (the Debezium outbox demo's shape): a
-- business table and the outbox, written in one transaction. Owned by
-- `app`; the relay's role `relay` (REPLICATION, member of `app`) creates its
-- publication and slot.
CREATE TABLE IF NOT EXISTS users (
  id bigserial PRIMARY KEY,
  email text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS outbox (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  aggregatetype text NOT NULL,
  aggregateid text NOT NULL,
  type text NOT NULL,
  payload jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
