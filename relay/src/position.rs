//! Binlog positions: MariaDB GTID lists, MySQL GTID sets, file + offset, and
//! the `start_from` setting. Pure code: parsing, formatting, advancing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} `{input}`: {reason}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

fn perr(what: &'static str, input: &str, reason: impl Into<String>) -> ParseError {
    ParseError {
        what,
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// One MariaDB GTID: `domain-server-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MariaGtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl fmt::Display for MariaGtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

impl FromStr for MariaGtid {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut parts = s.trim().splitn(3, '-');
        let mut next = |name: &str| {
            parts
                .next()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| perr("MariaDB GTID", s, format!("missing {name}")))
        };
        let domain = next("domain")?;
        let server = next("server id")?;
        let seq = next("sequence number")?;
        Ok(MariaGtid {
            domain: domain
                .parse()
                .map_err(|_| perr("MariaDB GTID", s, "domain is not a number"))?,
            server: server
                .parse()
                .map_err(|_| perr("MariaDB GTID", s, "server id is not a number"))?,
            seq: seq
                .parse()
                .map_err(|_| perr("MariaDB GTID", s, "sequence number is not a number"))?,
        })
    }
}

/// A MariaDB GTID position: the last GTID per replication domain
/// (`0-1-100,1-2-7`), as `@@gtid_binlog_pos` and `@slave_connect_state` use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MariaGtidList(BTreeMap<u32, MariaGtid>);

impl MariaGtidList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Records a committed transaction: its domain now ends at `gtid`.
    pub fn advance(&mut self, gtid: MariaGtid) {
        self.0.insert(gtid.domain, gtid);
    }

    pub fn get(&self, domain: u32) -> Option<MariaGtid> {
        self.0.get(&domain).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &MariaGtid> {
        self.0.values()
    }

    /// True when every transaction up to `other` is contained in `self`
    /// (each domain of `other` is present here with a sequence at least as high).
    pub fn contains(&self, other: &MariaGtidList) -> bool {
        other
            .iter()
            .all(|o| self.get(o.domain).is_some_and(|s| s.seq >= o.seq))
    }
}

impl fmt::Display for MariaGtidList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.0.values().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

impl FromStr for MariaGtidList {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut list = MariaGtidList::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let g: MariaGtid = part.parse()?;
            if list.0.contains_key(&g.domain) {
                return Err(perr(
                    "MariaDB GTID list",
                    s,
                    format!("domain {} appears twice", g.domain),
                ));
            }
            list.advance(g);
        }
        Ok(list)
    }
}

/// A MySQL GTID set: `uuid:1-5:7,uuid2:1-3`. Intervals are inclusive here and
/// kept sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MysqlGtidSet(BTreeMap<String, Vec<(u64, u64)>>);

impl MysqlGtidSet {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one transaction `uuid:gno`.
    pub fn add(&mut self, uuid: &str, gno: u64) {
        let ivs = self.0.entry(uuid.to_ascii_lowercase()).or_default();
        ivs.push((gno, gno));
        normalize(ivs);
    }

    /// Intervals per source uuid, inclusive.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[(u64, u64)])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

fn normalize(ivs: &mut Vec<(u64, u64)>) {
    ivs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ivs.len());
    for &(a, b) in ivs.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *ivs = out;
}

impl fmt::Display for MysqlGtidSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (uuid, ivs)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(uuid)?;
            for (a, b) in ivs {
                if a == b {
                    write!(f, ":{a}")?;
                } else {
                    write!(f, ":{a}-{b}")?;
                }
            }
        }
        Ok(())
    }
}

impl FromStr for MysqlGtidSet {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut set = MysqlGtidSet::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.split(':');
            let uuid = it.next().unwrap_or_default().to_ascii_lowercase();
            if !is_uuid(&uuid) {
                return Err(perr("MySQL GTID set", s, format!("`{uuid}` is not a UUID")));
            }
            let ivs = set.0.entry(uuid).or_default();
            let mut any = false;
            for iv in it {
                any = true;
                let (a, b) = match iv.split_once('-') {
                    Some((a, b)) => (a, b),
                    None => (iv, iv),
                };
                let a: u64 = a
                    .parse()
                    .map_err(|_| perr("MySQL GTID set", s, format!("bad interval `{iv}`")))?;
                let b: u64 = b
                    .parse()
                    .map_err(|_| perr("MySQL GTID set", s, format!("bad interval `{iv}`")))?;
                if a == 0 || b < a {
                    return Err(perr("MySQL GTID set", s, format!("bad interval `{iv}`")));
                }
                ivs.push((a, b));
            }
            if !any {
                return Err(perr("MySQL GTID set", s, "a UUID without intervals"));
            }
            normalize(ivs);
        }
        Ok(set)
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Formats 16 raw bytes as a canonical UUID string.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// The server's GTID position, in the flavour the server speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gtid {
    MariaDb(MariaGtidList),
    MySql(MysqlGtidSet),
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gtid::MariaDb(l) => l.fmt(f),
            Gtid::MySql(s) => s.fmt(f),
        }
    }
}

impl Gtid {
    /// Parses either flavour: a MySQL set has UUIDs, a MariaDB list has `d-s-n`.
    pub fn parse(s: &str) -> Result<Gtid, ParseError> {
        if s.contains(':') {
            Ok(Gtid::MySql(s.parse()?))
        } else {
            Ok(Gtid::MariaDb(s.parse()?))
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Gtid::MariaDb(l) => l.is_empty(),
            Gtid::MySql(s) => s.is_empty(),
        }
    }
}

impl Serialize for Gtid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Gtid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Gtid::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A binlog file and the offset of the next event to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    pub file: String,
    pub pos: u64,
}

impl fmt::Display for FilePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

impl FromStr for FilePos {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (file, pos) = s
            .rsplit_once(':')
            .ok_or_else(|| perr("binlog position", s, "expected FILE:POS"))?;
        if file.is_empty() {
            return Err(perr("binlog position", s, "empty file name"));
        }
        let pos: u64 = pos
            .parse()
            .map_err(|_| perr("binlog position", s, "POS is not a number"))?;
        if pos < 4 {
            return Err(perr(
                "binlog position",
                s,
                "POS must be at least 4 (the binlog header)",
            ));
        }
        Ok(FilePos {
            file: file.to_owned(),
            pos,
        })
    }
}

/// A committed binlog position: taken only at a transaction's commit, so
/// resuming from it never starts inside a transaction. Both forms are kept:
/// GTID survives a primary failover; the file offset, on the server that wrote
/// it, is found without MariaDB's GTID lookup (a read of the binlog file from
/// its start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogPosition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<Gtid>,
    #[serde(flatten)]
    pub file: FilePos,
    /// Commit time (server clock, seconds since the epoch) of the last
    /// transaction at or before this position; 0 when unknown.
    #[serde(default)]
    pub commit_ts: u32,
    /// `@@server_id` of the server whose binlog `file` and `pos` are in;
    /// absent in checkpoints of earlier versions and positions from settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
}

impl BinlogPosition {
    /// Short human form: the GTID when there is one, else `file:pos`.
    pub fn short(&self) -> String {
        match &self.gtid {
            Some(g) if !g.is_empty() => g.to_string(),
            _ => self.file.to_string(),
        }
    }
}

/// A PostgreSQL WAL location (`XXXXXXXX/XXXXXXXX` in text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| perr("LSN", s, "expected XXXXXXXX/XXXXXXXX"))?;
        let part =
            |x: &str| u32::from_str_radix(x, 16).map_err(|_| perr("LSN", s, "not hexadecimal"));
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A committed PostgreSQL position: the end of a transaction's commit
/// record. Resuming streams the transactions that commit after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsnPosition {
    pub lsn: Lsn,
    /// Commit time (seconds since the epoch) of that transaction; 0 when unknown.
    #[serde(default)]
    pub commit_ts: u32,
}

/// Where a source stands: a committed position of whichever database it
/// reads. Stored in the checkpoint as JSON (the two forms have distinct
/// fields, so the checkpoints of earlier versions read as they were).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Position {
    Binlog(BinlogPosition),
    Lsn(LsnPosition),
}

impl Position {
    /// Short human form: the GTID when there is one, else `file:pos`; the LSN.
    pub fn short(&self) -> String {
        match self {
            Position::Binlog(b) => b.short(),
            Position::Lsn(l) => l.lsn.to_string(),
        }
    }

    /// Where in the server's log: `file:pos`, or the LSN.
    pub fn location(&self) -> String {
        match self {
            Position::Binlog(b) => b.file.to_string(),
            Position::Lsn(l) => l.lsn.to_string(),
        }
    }

    /// Commit time (seconds since the epoch), 0 when unknown.
    pub fn commit_ts(&self) -> u32 {
        match self {
            Position::Binlog(b) => b.commit_ts,
            Position::Lsn(l) => l.commit_ts,
        }
    }

    /// A number that grows along the log (the offset in the binlog file, the
    /// LSN), for the checkpoint metric.
    pub fn offset(&self) -> u64 {
        match self {
            Position::Binlog(b) => b.file.pos,
            Position::Lsn(l) => l.lsn.0,
        }
    }
}

/// Where to start when no checkpoint is stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The server's current head: only rows committed from now on.
    #[default]
    Latest,
    /// The oldest binlog the server still has.
    Earliest,
    Gtid(Gtid),
    File(FilePos),
}

impl FromStr for StartFrom {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let t = s.trim();
        match t {
            "latest" => Ok(StartFrom::Latest),
            "earliest" => Ok(StartFrom::Earliest),
            _ => {
                if let Some(g) = t.strip_prefix("gtid:") {
                    Ok(StartFrom::Gtid(Gtid::parse(g)?))
                } else if let Some(f) = t.strip_prefix("file:") {
                    Ok(StartFrom::File(f.parse()?))
                } else {
                    Err(perr(
                        "start_from",
                        s,
                        "expected `latest`, `earliest`, `gtid:<gtid list or set>` or `file:<FILE>:<POS>`",
                    ))
                }
            }
        }
    }
}

impl fmt::Display for StartFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartFrom::Latest => f.write_str("latest"),
            StartFrom::Earliest => f.write_str("earliest"),
            StartFrom::Gtid(g) => write!(f, "gtid:{g}"),
            StartFrom::File(p) => write!(f, "file:{p}"),
        }
    }
}

impl<'de> Deserialize<'de> for StartFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for StartFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses MariaDB's raw GTID event (type 162) body: 8-byte sequence number,
/// 4-byte domain id, 1-byte flags. The server id comes from the event header.
pub fn parse_mariadb_gtid_event(data: &[u8], server: u32) -> Option<(MariaGtid, u8)> {
    let seq = u64::from_le_bytes(data.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?);
    let flags = *data.get(12)?;
    Some((
        MariaGtid {
            domain,
            server,
            seq,
        },
        flags,
    ))
}

/// Parses MariaDB's GTID list event (type 163): a 4-byte count (low 28 bits)
/// then `count` entries of domain (4), server (4), sequence (8).
pub fn parse_mariadb_gtid_list_event(data: &[u8]) -> Option<MariaGtidList> {
    let count = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) & 0x0fff_ffff;
    let mut list = MariaGtidList::default();
    for i in 0..count as usize {
        let at = 4 + i * 16;
        let e = data.get(at..at + 16)?;
        list.advance(MariaGtid {
            domain: u32::from_le_bytes(e[0..4].try_into().ok()?),
            server: u32::from_le_bytes(e[4..8].try_into().ok()?),
            seq: u64::from_le_bytes(e[8..16].try_into().ok()?),
        });
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_gtid_list_round_trips_sorted_by_domain() {
        let l: MariaGtidList = "1-2-7, 0-1-100".parse().unwrap();
        assert_eq!(l.to_string(), "0-1-100,1-2-7");
        assert_eq!(l.get(1).unwrap().seq, 7);
        assert_eq!("".parse::<MariaGtidList>().unwrap().to_string(), "");
    }

    #[test]
    fn mariadb_gtid_list_rejects_garbage_naming_the_input() {
        let e = "0-1".parse::<MariaGtidList>().unwrap_err();
        assert!(e.to_string().contains("`0-1`"), "{e}");
        assert!(e.to_string().contains("sequence number"), "{e}");
        let e = "0-1-x".parse::<MariaGtidList>().unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
        let e = "0-1-5,0-2-6".parse::<MariaGtidList>().unwrap_err();
        assert!(e.to_string().contains("domain 0 appears twice"), "{e}");
    }

    #[test]
    fn mariadb_advance_and_contains() {
        let mut l: MariaGtidList = "0-1-10".parse().unwrap();
        l.advance(MariaGtid {
            domain: 0,
            server: 2,
            seq: 11,
        });
        l.advance(MariaGtid {
            domain: 3,
            server: 1,
            seq: 1,
        });
        assert_eq!(l.to_string(), "0-2-11,3-1-1");
        assert!(l.contains(&"0-1-11".parse().unwrap()));
        assert!(!l.contains(&"0-1-12".parse().unwrap()));
        assert!(!l.contains(&"4-1-1".parse().unwrap()));
    }

    #[test]
    fn mysql_gtid_set_round_trips_and_merges() {
        let u = "3E11FA47-71CA-11E1-9E33-C80AA9429562";
        let s: MysqlGtidSet = format!("{u}:1-5:7:6, 4e11fa47-71ca-11e1-9e33-c80aa9429562:3")
            .parse()
            .unwrap();
        assert_eq!(
            s.to_string(),
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-7,4e11fa47-71ca-11e1-9e33-c80aa9429562:3"
        );
        let mut s2 = MysqlGtidSet::default();
        s2.add(u, 2);
        s2.add(u, 1);
        s2.add(u, 4);
        assert_eq!(s2.to_string(), "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-2:4");
        s2.add(u, 3);
        assert_eq!(s2.to_string(), "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-4");
    }

    #[test]
    fn mysql_gtid_set_rejects_bad_uuid_and_intervals() {
        assert!("nope:1-2".parse::<MysqlGtidSet>().is_err());
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        assert!(format!("{u}:5-2").parse::<MysqlGtidSet>().is_err());
        assert!(format!("{u}:0").parse::<MysqlGtidSet>().is_err());
        assert!(u.parse::<MysqlGtidSet>().is_err());
    }

    #[test]
    fn gtid_parse_picks_the_flavour() {
        assert!(matches!(Gtid::parse("0-1-5").unwrap(), Gtid::MariaDb(_)));
        assert!(matches!(
            Gtid::parse("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5").unwrap(),
            Gtid::MySql(_)
        ));
    }

    #[test]
    fn start_from_forms() {
        assert_eq!("latest".parse::<StartFrom>().unwrap(), StartFrom::Latest);
        assert_eq!(
            "earliest".parse::<StartFrom>().unwrap(),
            StartFrom::Earliest
        );
        assert_eq!(
            "file:mysql-bin.000003:1234".parse::<StartFrom>().unwrap(),
            StartFrom::File(FilePos {
                file: "mysql-bin.000003".into(),
                pos: 1234
            })
        );
        assert_eq!(
            "gtid:0-1-9".parse::<StartFrom>().unwrap().to_string(),
            "gtid:0-1-9"
        );
        let e = "yesterday".parse::<StartFrom>().unwrap_err().to_string();
        assert!(e.contains("`yesterday`") && e.contains("earliest"), "{e}");
        assert!("file:mysql-bin.000003:2".parse::<StartFrom>().is_err());
        assert!("file:nopos".parse::<StartFrom>().is_err());
    }

    #[test]
    fn position_json_round_trip() {
        let b = BinlogPosition {
            gtid: Some(Gtid::parse("0-1-42").unwrap()),
            file: FilePos {
                file: "mysql-bin.000002".into(),
                pos: 777,
            },
            commit_ts: 1_700_000_000,
            server_id: Some(7),
        };
        let p = Position::Binlog(b.clone());
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"gtid":"0-1-42","file":"mysql-bin.000002","pos":777,"commit_ts":1700000000,"server_id":7}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&j).unwrap(), p);
        // A checkpoint of an earlier version (no server id) still reads.
        let old = r#"{"gtid":"0-1-42","file":"mysql-bin.000002","pos":777,"commit_ts":1700000000}"#;
        let Position::Binlog(read) = serde_json::from_str::<Position>(old).unwrap() else {
            panic!("not a binlog position");
        };
        assert_eq!(read.server_id, None);
        assert_eq!(read.file, b.file);
        assert_eq!(p.short(), "0-1-42");
        let no_gtid = Position::Binlog(BinlogPosition { gtid: None, ..b });
        assert_eq!(no_gtid.short(), "mysql-bin.000002:777");
    }

    #[test]
    fn lsn_positions_round_trip_beside_binlog_ones() {
        let p = Position::Lsn(LsnPosition {
            lsn: "16/B374D848".parse().unwrap(),
            commit_ts: 1_700_000_000,
        });
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, r#"{"lsn":"16/B374D848","commit_ts":1700000000}"#);
        assert_eq!(serde_json::from_str::<Position>(&j).unwrap(), p);
        assert_eq!(p.short(), "16/B374D848");
        assert_eq!(p.offset(), 0x16_B374_D848);
        let e = "16-B3".parse::<Lsn>().unwrap_err();
        assert!(e.to_string().contains("`16-B3`"), "{e}");
        assert!("1/XYZ".parse::<Lsn>().is_err());
    }

    #[test]
    fn raw_mariadb_events_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&42u64.to_le_bytes());
        d.extend_from_slice(&3u32.to_le_bytes());
        d.push(1);
        let (g, flags) = parse_mariadb_gtid_event(&d, 9).unwrap();
        assert_eq!(g.to_string(), "3-9-42");
        assert_eq!(flags, 1);
        assert!(parse_mariadb_gtid_event(&d[..10], 9).is_none());

        let mut l = Vec::new();
        l.extend_from_slice(&2u32.to_le_bytes());
        for (dom, srv, seq) in [(0u32, 1u32, 5u64), (1, 2, 9)] {
            l.extend_from_slice(&dom.to_le_bytes());
            l.extend_from_slice(&srv.to_le_bytes());
            l.extend_from_slice(&seq.to_le_bytes());
        }
        assert_eq!(
            parse_mariadb_gtid_list_event(&l).unwrap().to_string(),
            "0-1-5,1-2-9"
        );
        assert!(parse_mariadb_gtid_list_event(&l[..20]).is_none());
    }

    #[test]
    fn uuid_formatting() {
        let b = [
            0x3e, 0x11, 0xfa, 0x47, 0x71, 0xca, 0x11, 0xe1, 0x9e, 0x33, 0xc8, 0x0a, 0xa9, 0x42,
            0x95, 0x62,
        ];
        assert_eq!(format_uuid(&b), "3e11fa47-71ca-11e1-9e33-c80aa9429562");
    }

    /// Fuzzing the parsers a checkpoint, a config and the binlog feed: any
    /// input is an error or a value that prints and parses back to itself;
    /// nothing panics. (`PROPTEST_CASES` raises the count.)
    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn maria() -> impl Strategy<Value = MariaGtidList> {
            proptest::collection::btree_map(any::<u32>(), (any::<u32>(), any::<u64>()), 0..5)
                .prop_map(|m| {
                    let mut l = MariaGtidList::default();
                    for (domain, (server, seq)) in m {
                        l.advance(MariaGtid {
                            domain,
                            server,
                            seq,
                        });
                    }
                    l
                })
        }

        fn mysql() -> impl Strategy<Value = MysqlGtidSet> {
            proptest::collection::vec((any::<[u8; 16]>(), 1..u64::MAX, 0..1000u64), 0..5).prop_map(
                |v| {
                    let mut s = MysqlGtidSet::default();
                    for (uuid, start, len) in v {
                        let u = format_uuid(&uuid);
                        for g in start..start.saturating_add(len % 4).max(start) {
                            s.add(&u, g);
                        }
                        s.add(&u, start.saturating_add(len));
                    }
                    s
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn any_text_parses_or_fails_without_panicking(s in "\\PC{0,80}") {
                let _ = s.parse::<MariaGtidList>();
                let _ = s.parse::<MysqlGtidSet>();
                let _ = s.parse::<FilePos>();
                let _ = Gtid::parse(&s);
                if let Ok(start) = s.parse::<StartFrom>() {
                    prop_assert_eq!(start.to_string().parse::<StartFrom>().ok(), Some(start));
                }
            }

            #[test]
            fn gtid_shaped_text_parses_or_fails_without_panicking(
                s in "[0-9a-f:,\\- ]{0,120}"
            ) {
                if let Ok(g) = Gtid::parse(&s) {
                    let printed = g.to_string();
                    let again = Gtid::parse(&printed).expect("printed GTID parses");
                    prop_assert_eq!(again.to_string(), printed);
                }
            }

            #[test]
            fn mariadb_lists_round_trip(l in maria()) {
                prop_assert_eq!(l.to_string().parse::<MariaGtidList>(), Ok(l.clone()));
                prop_assert!(l.contains(&l));
            }

            #[test]
            fn mysql_sets_round_trip(s in mysql()) {
                prop_assert_eq!(s.to_string().parse::<MysqlGtidSet>(), Ok(s.clone()));
            }

            #[test]
            fn checkpoints_round_trip_through_json(
                l in maria(),
                set in mysql(),
                file in "[a-z0-9._:-]{1,30}",
                pos in 4..u64::MAX,
                commit_ts in any::<u32>(),
                server_id in proptest::option::of(any::<u32>()),
                which in 0..3u8,
            ) {
                let gtid = match which {
                    0 => None,
                    1 => Some(Gtid::MariaDb(l)),
                    _ => Some(Gtid::MySql(set)),
                };
                let p = BinlogPosition { gtid, file: FilePos { file, pos }, commit_ts, server_id };
                let json = serde_json::to_string(&Position::Binlog(p.clone())).expect("json");
                let Position::Binlog(back) = serde_json::from_str(&json).expect("parse back") else {
                    panic!("a binlog position read back as another kind: {json}");
                };
                prop_assert_eq!(back.file, p.file);
                prop_assert_eq!(back.commit_ts, p.commit_ts);
                prop_assert_eq!(back.server_id, p.server_id);
                // An empty set prints as "" in either flavour; both mean "nothing yet".
                prop_assert_eq!(
                    back.gtid.map(|g| g.to_string()),
                    p.gtid.map(|g| g.to_string())
                );
            }

            #[test]
            fn raw_mariadb_events_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), server in any::<u32>()) {
                if let Some((g, _)) = parse_mariadb_gtid_event(&data, server) {
                    prop_assert!(data.len() >= 13);
                    prop_assert_eq!(g.server, server);
                }
                if let Some(l) = parse_mariadb_gtid_list_event(&data) {
                    prop_assert!(l.iter().count() * 16 + 4 <= data.len());
                }
            }
        }
    }
}
