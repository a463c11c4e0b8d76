//! Every column type MariaDB has — NULLs, extremes, BLOBs, BIT, ENUM, SET,
//! DECIMAL, spatial, JSON, INET4/6, UUID, zero and extreme dates — in another
//! table and as extra columns of the outbox table itself, inserted, updated
//! and deleted between outbox rows: the relay decodes them all, keeps
//! going, and relays every outbox row.

use std::time::Duration;

use crate::support::*;

/// Every type once; `outbox` gets the same columns as unmapped extras.
const COLUMNS: &str = "
    c_tinyint TINYINT NULL, c_utinyint TINYINT UNSIGNED NULL,
    c_smallint SMALLINT NULL, c_usmallint SMALLINT UNSIGNED NULL,
    c_mediumint MEDIUMINT NULL, c_umediumint MEDIUMINT UNSIGNED NULL,
    c_int INT NULL, c_uint INT UNSIGNED NULL,
    c_bigint BIGINT NULL, c_ubigint BIGINT UNSIGNED NULL,
    c_bool BOOLEAN NULL,
    c_decimal DECIMAL(65,30) NULL, c_decimal0 DECIMAL(10,0) NULL,
    c_float FLOAT NULL, c_double DOUBLE NULL,
    c_bit1 BIT(1) NULL, c_bit64 BIT(64) NULL,
    c_date DATE NULL, c_datetime DATETIME NULL, c_datetime6 DATETIME(6) NULL,
    c_timestamp6 TIMESTAMP(6) NULL, c_time TIME NULL, c_time6 TIME(6) NULL,
    c_year YEAR NULL,
    c_char CHAR(10) NULL, c_varchar VARCHAR(300) NULL,
    c_latin1 VARCHAR(20) CHARACTER SET latin1 NULL,
    c_binary BINARY(16) NULL, c_varbinary VARBINARY(100) NULL,
    c_tinyblob TINYBLOB NULL, c_blob BLOB NULL, c_mediumblob MEDIUMBLOB NULL,
    c_longblob LONGBLOB NULL,
    c_tinytext TINYTEXT NULL, c_text TEXT NULL, c_mediumtext MEDIUMTEXT NULL,
    c_longtext LONGTEXT NULL,
    c_enum ENUM('a','b','c') NULL, c_set SET('x','y','z') NULL,
    c_json JSON NULL,
    c_geometry GEOMETRY NULL, c_point POINT NULL, c_linestring LINESTRING NULL,
    c_polygon POLYGON NULL, c_multipoint MULTIPOINT NULL,
    c_multilinestring MULTILINESTRING NULL, c_multipolygon MULTIPOLYGON NULL,
    c_collection GEOMETRYCOLLECTION NULL,
    c_inet4 INET4 NULL, c_inet6 INET6 NULL, c_uuid UUID NULL";

/// The column names of `COLUMNS`.
fn names() -> Vec<&'static str> {
    COLUMNS
        .split(',')
        .filter_map(|c| c.split_whitespace().next())
        .filter(|n| n.starts_with("c_"))
        .collect()
}

/// Value lists (in `names()` order): the smallest values, the largest, and
/// the odd ones (zero dates, empty ENUM/SET, negative TIME, emoji).
const VALUES: [&str; 3] = [
    "-128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -9223372036854775808, 0, \
     FALSE, -99999999999999999999999999999999999.999999999999999999999999999999, -9999999999, \
     -3.402823466E+38, -1.7976931348623157E308, b'0', b'0', \
     '1000-01-01', '1000-01-01 00:00:00', '1000-01-01 00:00:00.000000', \
     '1970-01-01 00:00:01.000000', '-838:59:59', '-838:59:59.000000', 1901, \
     '', '', '', x'00000000000000000000000000000000', x'', x'', x'', x'', x'', \
     '', '', '', '', 'a', '', '{}', \
     ST_GeomFromText('POINT(0 0)'), ST_GeomFromText('POINT(-180 -90)'), \
     ST_GeomFromText('LINESTRING(0 0, 1 1)'), ST_GeomFromText('POLYGON((0 0, 1 0, 1 1, 0 0))'), \
     ST_GeomFromText('MULTIPOINT(0 0, 1 1)'), ST_GeomFromText('MULTILINESTRING((0 0, 1 1), (2 2, 3 3))'), \
     ST_GeomFromText('MULTIPOLYGON(((0 0, 1 0, 1 1, 0 0)))'), \
     ST_GeomFromText('GEOMETRYCOLLECTION(POINT(1 1), LINESTRING(0 0, 1 1))'), \
     '0.0.0.0', '::', '00000000-0000-0000-0000-000000000000'",
    "127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295, \
     9223372036854775807, 18446744073709551615, TRUE, \
     99999999999999999999999999999999999.999999999999999999999999999999, 9999999999, \
     3.402823466E+38, 1.7976931348623157E308, b'1', b'1111111111111111111111111111111111111111111111111111111111111111', \
     '9999-12-31', '9999-12-31 23:59:59', '9999-12-31 23:59:59.999999', \
     '2038-01-19 03:14:07.999999', '838:59:59', '838:59:59.999999', 2155, \
     'ten chars!', REPEAT('é', 300), 'Ünïcödé', x'ffffffffffffffffffffffffffffffff', \
     x'00ff00ff', REPEAT(x'ff', 255), REPEAT(x'fe', 65535), REPEAT(x'fd', 100000), \
     REPEAT(x'fc', 200000), REPEAT('t', 255), REPEAT('😀', 16000), REPEAT('m', 100000), \
     REPEAT('l', 200000), 'c', 'x,y,z', \
     '{\"a\": [1, 2.5, \"😀\", null, true], \"b\": {\"c\": 18446744073709551615}}', \
     ST_GeomFromText('POLYGON((0 0, 10 0, 10 10, 0 10, 0 0), (1 1, 2 1, 2 2, 1 1))'), \
     ST_GeomFromText('POINT(179.999999 89.999999)'), \
     ST_GeomFromText('LINESTRING(-1.5 -1.5, 1e10 1e10)'), \
     ST_GeomFromText('POLYGON((0 0, 10 0, 10 10, 0 0))'), \
     ST_GeomFromText('MULTIPOINT(1 1)'), ST_GeomFromText('MULTILINESTRING((0 0, 1 1))'), \
     ST_GeomFromText('MULTIPOLYGON(((0 0, 1 0, 1 1, 0 0)), ((5 5, 6 5, 6 6, 5 5)))'), \
     ST_GeomFromText('GEOMETRYCOLLECTION(POINT(2 2))'), \
     '255.255.255.255', 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', \
     'ffffffff-ffff-ffff-ffff-ffffffffffff'",
    "0, 1, 0, 1, 0, 1, 0, 1, 0, 1, NULL, 0.000000000000000000000000000001, 0, \
     1.17549435E-38, 2.2250738585072014E-308, NULL, b'101', \
     '0000-00-00', '0000-00-00 00:00:00', '2024-02-29 12:34:56.123456', \
     NULL, '00:00:00', '-00:00:00.000001', 0, \
     NULL, 'x', NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
     NULL, NULL, NULL, NULL, '', '', '[]', \
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
     '192.168.0.1', '::ffff:192.168.0.1', '123e4567-e89b-12d3-a456-426614174000'",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_is_decoded_and_the_relay_keeps_going() {
    let f = Fixture::new("types", mysql_port(), &["Order"], 3).await;
    let db = &f.db;
    db.exec(&format!(
        "CREATE TABLE zoo (id INT AUTO_INCREMENT PRIMARY KEY, {COLUMNS}) \
         ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    ))
    .await;
    db.exec(&format!("ALTER TABLE outbox ADD COLUMN ({COLUMNS})"))
        .await;
    let spec = f.spec();
    let port = free_port();
    let mut relay = Relay::start(&f.dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;

    let cols = names().join(", ");
    // Zero dates need a permissive SQL mode.
    let mode = "SET SESSION sql_mode = 'ALLOW_INVALID_DATES'";
    let mut c = db.pool.get_conn().await.expect("connect");
    use mysql_async::prelude::Queryable;
    c.query_drop(mode).await.expect("sql_mode");
    c.query_drop("SET NAMES utf8mb4").await.expect("names");
    let mut outbox = 0;
    for (i, values) in VALUES.iter().enumerate() {
        // Another table and an outbox row with the same odd values, in one
        // transaction; a row of NULLs in both; then updates and deletes.
        let q = format!(
            "BEGIN; \
             INSERT INTO zoo ({cols}) VALUES ({values}); \
             INSERT INTO zoo (c_int) VALUES (NULL); \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, {cols}) \
               VALUES ('Order', 'k{i}', 'Typed', '{{\"row\":{i}}}', {values}); \
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
               VALUES ('Order', 'k{i}', 'Plain', '{{}}'); \
             COMMIT"
        );
        c.query_drop(&q)
            .await
            .unwrap_or_else(|e| panic!("row {i}: {e}"));
        outbox += 2;
        c.query_drop(format!(
            "BEGIN; UPDATE zoo SET c_json = '{{\"u\":{i}}}', c_point = ST_GeomFromText('POINT(3 3)'), \
             c_decimal = -c_decimal WHERE id > 0; \
             UPDATE outbox SET c_set = 'x', c_bit64 = b'1' WHERE aggregate_id = 'k{i}'; COMMIT"
        ))
        .await
        .unwrap_or_else(|e| panic!("update {i}: {e}"));
    }
    // Several typed rows in one statement, so one rows event holds them: a
    // value decoded with the wrong length would shift every row after it.
    c.query_drop(format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, {cols}) VALUES \
         ('Order', 'm0', 'Typed', '{{\"multi\":0}}', {a}), \
         ('Order', 'm1', 'Typed', '{{\"multi\":1}}', {b}), \
         ('Order', 'm2', 'Typed', '{{\"multi\":2}}', {a}), \
         ('Order', 'm3', 'Typed', '{{\"multi\":3}}', {b})",
        a = VALUES[0],
        b = VALUES[2],
    ))
    .await
    .expect("multi-row insert");
    outbox += 4;
    c.query_drop("DELETE FROM zoo WHERE id % 2 = 0")
        .await
        .expect("delete");
    // A transaction of other tables only, then one more outbox row.
    c.query_drop(format!("INSERT INTO zoo ({cols}) VALUES ({})", VALUES[1]))
        .await
        .expect("zoo only");
    drop(c);
    db.insert_txn(&[Ev::new("Order", "last", "{}")]).await;
    outbox += 1;

    wait_checkpoint_at_head(redis_url(), &f.name, db, Duration::from_secs(60)).await;
    assert!(relay.alive(), "{}", relay.logs());
    assert_eq!(relay.role().await.as_deref(), Some("streaming"));
    let rows = db.rows().await;
    assert_eq!(rows.len(), outbox);
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(60)).await;
    let report = check(&rows, &recs);
    report.assert_complete();
    assert_eq!(report.duplicates, 0);
    // Every payload exactly as stored.
    let mut c = db.pool.get_conn().await.expect("connect");
    let stored: Vec<(u64, Vec<u8>)> = c
        .query("SELECT id, payload FROM outbox ORDER BY id")
        .await
        .expect("payloads");
    drop(c);
    for (id, payload) in stored {
        let r = recs.iter().find(|r| r.id() == id).expect("record");
        assert_eq!(
            r.value.as_deref(),
            Some(payload.as_slice()),
            "payload of row {id}"
        );
    }
    // The updates of outbox rows were counted, not relayed.
    assert!(
        relay.metric("outbox_relay_ignored_rows_total").await >= 6.0,
        "{}",
        relay.logs()
    );
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}
