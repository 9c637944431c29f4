--
-- PostgreSQL database dump
--

\restrict 5sj8XdcNNfTsWD0czFbWOYwdhhtqphGArGdoJRLifQrCFDjuJYT0iHrUCgpfiqF

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: admin_events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.admin_events (
    id bigint NOT NULL,
    ts double precision NOT NULL,
    actor character varying(80) NOT NULL,
    action character varying(40) NOT NULL,
    token_id character varying(40) NOT NULL,
    root_id character varying(40) NOT NULL,
    detail json NOT NULL
);


--
-- Name: admin_events_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.admin_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: admin_events_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.admin_events_id_seq OWNED BY public.admin_events.id;


--
-- Name: alembic_version; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.alembic_version (
    version_num character varying(32) NOT NULL
);


--
-- Name: alerts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.alerts (
    id bigint NOT NULL,
    ts double precision NOT NULL,
    kind character varying(20) NOT NULL,
    token_id character varying(40) NOT NULL,
    root_id character varying(40) NOT NULL,
    threshold integer NOT NULL,
    consumed bigint NOT NULL,
    allocation bigint NOT NULL,
    status character varying(16) NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    delivered_at double precision,
    channels json,
    next_attempt_at double precision,
    acknowledged_at double precision,
    acknowledged_by character varying(80)
);


--
-- Name: alerts_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.alerts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: alerts_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.alerts_id_seq OWNED BY public.alerts.id;


--
-- Name: idempotency; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.idempotency (
    token_id character varying(40) NOT NULL,
    key character varying(255) NOT NULL,
    body_hash character varying(128) NOT NULL,
    request_id character varying(64) NOT NULL,
    state character varying(16) NOT NULL,
    result text,
    created_at double precision NOT NULL
);


--
-- Name: leases; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.leases (
    id character varying(40) NOT NULL,
    token_id character varying(40) NOT NULL,
    root_id character varying(40) NOT NULL,
    holder character varying(120) NOT NULL,
    units bigint NOT NULL,
    granted_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    seq bigint DEFAULT '0'::bigint NOT NULL
);


--
-- Name: ledger_shards; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.ledger_shards (
    shard integer NOT NULL,
    epoch bigint NOT NULL,
    holder character varying(120),
    started_at double precision
);


--
-- Name: ledger_shards_shard_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.ledger_shards_shard_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: ledger_shards_shard_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.ledger_shards_shard_seq OWNED BY public.ledger_shards.shard;


--
-- Name: tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.tokens (
    id character varying(40) NOT NULL,
    root_id character varying(40) NOT NULL,
    parent_id character varying(40),
    name character varying(200) NOT NULL,
    team character varying(200),
    allocation bigint NOT NULL,
    used bigint NOT NULL,
    status character varying(16) NOT NULL,
    expires_at double precision,
    models json,
    ips json,
    rate json,
    jti character varying(64) NOT NULL,
    created_at double precision NOT NULL,
    thresholds json NOT NULL,
    fired json NOT NULL,
    meta json NOT NULL,
    slot integer DEFAULT 0 NOT NULL
);


--
-- Name: usage_events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.usage_events (
    id bigint NOT NULL,
    ts double precision NOT NULL,
    root_id character varying(40) NOT NULL,
    token_id character varying(40) NOT NULL,
    request_id character varying(64) NOT NULL,
    model character varying(200) NOT NULL,
    units bigint NOT NULL,
    state character varying(16) NOT NULL,
    outcome character varying(40) NOT NULL,
    client_ip character varying(64),
    image_bytes bigint NOT NULL,
    latency_ms double precision,
    detections integer,
    gpu_ms double precision,
    settled_at double precision,
    body_hash character varying(128)
);


--
-- Name: usage_events_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.usage_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: usage_events_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.usage_events_id_seq OWNED BY public.usage_events.id;


--
-- Name: admin_events id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.admin_events ALTER COLUMN id SET DEFAULT nextval('public.admin_events_id_seq'::regclass);


--
-- Name: alerts id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts ALTER COLUMN id SET DEFAULT nextval('public.alerts_id_seq'::regclass);


--
-- Name: ledger_shards shard; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ledger_shards ALTER COLUMN shard SET DEFAULT nextval('public.ledger_shards_shard_seq'::regclass);


--
-- Name: usage_events id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usage_events ALTER COLUMN id SET DEFAULT nextval('public.usage_events_id_seq'::regclass);


--
-- Data for Name: admin_events; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.admin_events VALUES (1, 1795000001.5, 'admin', 'package.create', 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', '{"allocation": 1000, "name": "acme"}');
INSERT INTO public.admin_events VALUES (2, 1795000002, 'admin', 'token.split', 'tok_rA4fNfcYKq14PXFKc7O0', 'pkg_FHPvrEmFRtJccCvomty_', '{"parent": "pkg_FHPvrEmFRtJccCvomty_", "allocation": 100, "name": "frontend"}');
INSERT INTO public.admin_events VALUES (3, 1795000002.5, 'admin', 'token.split', 'tok_bn3aGY8dcKH_RFEbVL5F', 'pkg_FHPvrEmFRtJccCvomty_', '{"parent": "tok_rA4fNfcYKq14PXFKc7O0", "allocation": 20, "name": "frontend-ci"}');
INSERT INTO public.admin_events VALUES (4, 1795000003, 'admin', 'token.split', 'tok_ai67nJ4vDOP5GxnUExfB', 'pkg_FHPvrEmFRtJccCvomty_', '{"parent": "pkg_FHPvrEmFRtJccCvomty_", "allocation": 50, "name": "batch"}');
INSERT INTO public.admin_events VALUES (5, 1795000003.5, 'admin', 'token.split', 'tok_s8XhN-yBxycBNlwDcKPO', 'pkg_FHPvrEmFRtJccCvomty_', '{"parent": "pkg_FHPvrEmFRtJccCvomty_", "allocation": 30, "name": "gone"}');
INSERT INTO public.admin_events VALUES (6, 1795000009.25, 'admin', 'token.top_up', 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', '{"units": 500, "allocation": 1500}');
INSERT INTO public.admin_events VALUES (7, 1795000009.5, 'admin', 'token.reclaim', 'tok_rA4fNfcYKq14PXFKc7O0', 'pkg_FHPvrEmFRtJccCvomty_', '{"units": 10}');
INSERT INTO public.admin_events VALUES (8, 1795000009.75, 'admin', 'token.revoke', 'tok_s8XhN-yBxycBNlwDcKPO', 'pkg_FHPvrEmFRtJccCvomty_', '{"returned": 30, "subtree": 1}');
INSERT INTO public.admin_events VALUES (9, 1795000010, 'admin', 'token.rotate', 'tok_ai67nJ4vDOP5GxnUExfB', 'pkg_FHPvrEmFRtJccCvomty_', '{}');


--
-- Data for Name: alembic_version; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.alembic_version VALUES ('0005');


--
-- Data for Name: alerts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.alerts VALUES (1, 1795000006.25, 'usage', 'tok_bn3aGY8dcKH_RFEbVL5F', 'pkg_FHPvrEmFRtJccCvomty_', 80, 17, 20, 'delivered', 1, NULL, 1795000099, '{"email:pm@example.com": {"status": "delivered", "attempts": 1, "error": null, "at": 1795000099.0}}', NULL, 1795000100, 'pm');


--
-- Data for Name: idempotency; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.idempotency VALUES ('pkg_FHPvrEmFRtJccCvomty_', 'key-done', 'h-done', 'idem-done', 'done', '{"images": [], "stored": true}', 1795000008.25);
INSERT INTO public.idempotency VALUES ('pkg_FHPvrEmFRtJccCvomty_', 'key-pending', 'h-pending', 'idem-pending', 'pending', NULL, 1795000008.75);


--
-- Data for Name: leases; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: ledger_shards; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.ledger_shards VALUES (0, 1, 'in-process', 1795000000.5);


--
-- Data for Name: tokens; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.tokens VALUES ('tok_bn3aGY8dcKH_RFEbVL5F', 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'frontend-ci', 'web', 20, 17, 'active', NULL, 'null', 'null', 'null', 'jti_F7FcA4whS_WxVaNO2-o9', 1795000002.5, '[80, 95, 100]', '[80]', '{}', 621);
INSERT INTO public.tokens VALUES ('pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', NULL, 'acme', 'vision', 1500, 5, 'active', NULL, '["parts"]', '["10.0.0.0/8"]', '{"rate": 10.0, "burst": 20, "name": "pro"}', 'jti_GiTSBPhyMPAdVCo14qjU', 1795000001.5, '[80, 95, 100]', '[]', '{"alert_emails": ["pm@example.com"], "cost_centre": "CC-7"}', 621);
INSERT INTO public.tokens VALUES ('tok_rA4fNfcYKq14PXFKc7O0', 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'frontend', 'web', 90, 9, 'active', NULL, 'null', 'null', 'null', 'jti_GF7GXcaF_gEtEIlKPGTv', 1795000002, '[80, 95, 100]', '[]', '{"_returned": 10}', 621);
INSERT INTO public.tokens VALUES ('tok_s8XhN-yBxycBNlwDcKPO', 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'gone', 'vision', 0, 0, 'revoked', NULL, 'null', 'null', 'null', 'jti_Y8qHhMgyb1tO7nozcv77', 1795000003.5, '[80, 95, 100]', '[]', '{"_returned": 30}', 621);
INSERT INTO public.tokens VALUES ('tok_ai67nJ4vDOP5GxnUExfB', 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'batch', 'vision', 50, 2, 'active', NULL, 'null', 'null', '{"rate": 0.03333333333333333, "burst": 2, "name": null}', 'jti_vd8mklVvvVQmTe9BwN0i', 1795000003, '[80, 95, 100]', '[]', '{}', 621);


--
-- Data for Name: usage_events; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.usage_events VALUES (4096, 1795000004.75, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-3', 'parts@1', 2, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (5120, 1795000005, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-4', 'parts@1', 2, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (6144, 1795000005.25, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-5', 'parts@1', 2, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (1024, 1795000004, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-0', 'parts@1', 2, 'settled', 'ok', '10.0.0.1', 0, 12.5, 3, 4, 1795000005.5, '');
INSERT INTO public.usage_events VALUES (2048, 1795000004.25, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-1', 'parts@1', 1, 'settled', 'ok', '10.0.0.1', 0, 8, 1, 2, 1795000005.75, '');
INSERT INTO public.usage_events VALUES (3072, 1795000004.5, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-2', 'parts@1', 0, 'refunded', 'ok', '10.0.0.1', 0, 30, 0, 0, 1795000006, '');
INSERT INTO public.usage_events VALUES (7168, 1795000006.25, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_bn3aGY8dcKH_RFEbVL5F', 'a1-big', 'parts@1', 17, 'settled', 'ok', '10.0.0.1', 0, 0, 0, 0, 1795000006.5, '');
INSERT INTO public.usage_events VALUES (8192, 1795000006.75, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_bn3aGY8dcKH_RFEbVL5F', 'a1-quota', 'parts@1', 0, 'denied', 'quota_exhausted', '10.0.0.1', 0, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.usage_events VALUES (9216, 1795000007, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-model', 'other@1', 0, 'denied', 'model_not_allowed', '10.0.0.1', 0, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.usage_events VALUES (10240, 1795000007.25, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_rA4fNfcYKq14PXFKc7O0', 'a-ip', 'parts@1', 0, 'denied', 'ip_not_allowed', '192.168.0.9', 0, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.usage_events VALUES (11264, 1795000007.5, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_ai67nJ4vDOP5GxnUExfB', 'b-0', 'parts@1', 1, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (12288, 1795000007.75, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_ai67nJ4vDOP5GxnUExfB', 'b-1', 'parts@1', 1, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (13312, 1795000008, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_ai67nJ4vDOP5GxnUExfB', 'b-2', 'parts@1', 0, 'denied', 'rate_limited', '10.0.0.1', 0, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.usage_events VALUES (14336, 1795000008.25, 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'idem-done', 'parts@1', 1, 'settled', 'ok', '10.0.0.1', 0, 0, 0, 0, 1795000008.5, 'h-done');
INSERT INTO public.usage_events VALUES (15360, 1795000008.75, 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'idem-pending', 'parts@1', 1, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, 'h-pending');
INSERT INTO public.usage_events VALUES (16384, 1795000009, 'pkg_FHPvrEmFRtJccCvomty_', 'pkg_FHPvrEmFRtJccCvomty_', 'plain-pending', 'parts@1', 3, 'admitted', 'ok', '10.0.0.1', 0, NULL, NULL, NULL, NULL, '');
INSERT INTO public.usage_events VALUES (17408, 1795000010.5, 'pkg_FHPvrEmFRtJccCvomty_', 'tok_ai67nJ4vDOP5GxnUExfB', 'b-old-jti', 'parts@1', 0, 'denied', 'revoked_token', '10.0.0.1', 0, NULL, NULL, NULL, NULL, NULL);


--
-- Name: admin_events_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.admin_events_id_seq', 9, true);


--
-- Name: alerts_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.alerts_id_seq', 1, true);


--
-- Name: ledger_shards_shard_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.ledger_shards_shard_seq', 1, false);


--
-- Name: usage_events_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.usage_events_id_seq', 1, false);


--
-- Name: admin_events admin_events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.admin_events
    ADD CONSTRAINT admin_events_pkey PRIMARY KEY (id);


--
-- Name: alembic_version alembic_version_pkc; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alembic_version
    ADD CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num);


--
-- Name: alerts alerts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_pkey PRIMARY KEY (id);


--
-- Name: idempotency idempotency_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.idempotency
    ADD CONSTRAINT idempotency_pkey PRIMARY KEY (token_id, key);


--
-- Name: leases leases_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (id);


--
-- Name: ledger_shards ledger_shards_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ledger_shards
    ADD CONSTRAINT ledger_shards_pkey PRIMARY KEY (shard);


--
-- Name: tokens tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.tokens
    ADD CONSTRAINT tokens_pkey PRIMARY KEY (id);


--
-- Name: usage_events usage_events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usage_events
    ADD CONSTRAINT usage_events_pkey PRIMARY KEY (id);


--
-- Name: ix_admin_events_root_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_admin_events_root_id ON public.admin_events USING btree (root_id);


--
-- Name: ix_admin_events_token_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_admin_events_token_id ON public.admin_events USING btree (token_id);


--
-- Name: ix_admin_events_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_admin_events_ts ON public.admin_events USING btree (ts);


--
-- Name: ix_alerts_status; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_alerts_status ON public.alerts USING btree (status);


--
-- Name: ix_alerts_token_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_alerts_token_id ON public.alerts USING btree (token_id);


--
-- Name: ix_alerts_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_alerts_ts ON public.alerts USING btree (ts);


--
-- Name: ix_idempotency_created_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_idempotency_created_at ON public.idempotency USING btree (created_at);


--
-- Name: ix_leases_root_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_leases_root_id ON public.leases USING btree (root_id);


--
-- Name: ix_leases_token_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_leases_token_id ON public.leases USING btree (token_id);


--
-- Name: ix_tokens_parent_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_tokens_parent_id ON public.tokens USING btree (parent_id);


--
-- Name: ix_tokens_root_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_tokens_root_id ON public.tokens USING btree (root_id);


--
-- Name: ix_tokens_slot; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_tokens_slot ON public.tokens USING btree (slot);


--
-- Name: ix_usage_events_request_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_usage_events_request_id ON public.usage_events USING btree (request_id);


--
-- Name: ix_usage_events_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_usage_events_ts ON public.usage_events USING btree (ts);


--
-- Name: ix_usage_root_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_usage_root_ts ON public.usage_events USING btree (root_id, ts);


--
-- Name: ix_usage_token_ts; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_usage_token_ts ON public.usage_events USING btree (token_id, ts);


--
-- PostgreSQL database dump complete
--

\unrestrict 5sj8XdcNNfTsWD0czFbWOYwdhhtqphGArGdoJRLifQrCFDjuJYT0iHrUCgpfiqF

