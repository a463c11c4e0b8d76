//! Prints records of Kafka topics from the beginning: `tail BROKERS TOPIC... [--max N]`.
//! Used by the local demo to show what the relay produced.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut max = usize::MAX;
    if let Some(i) = args.iter().position(|a| a == "--max") {
        max = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        args.drain(i..(i + 2).min(args.len()));
    }
    let Some((brokers, topics)) = args.split_first() else {
        eprintln!("usage: tail BROKERS TOPIC... [--max N]");
        std::process::exit(2);
    };
    let mut printed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for topic in topics {
        let probe: BaseConsumer = consumer(brokers);
        let md = probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = probe
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            // One partition at a time (tansu serves one partition per fetch).
            let c = consumer(brokers);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(0))
                .expect("offset");
            c.assign(&tpl).expect("assign");
            let mut next = 0;
            let mut idle = Instant::now();
            while (next < high || idle.elapsed() < Duration::from_secs(2))
                && printed < max
                && Instant::now() < deadline
            {
                let m = match c.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        eprintln!("poll: {e}");
                        continue;
                    }
                    None => continue,
                };
                idle = Instant::now();
                next = m.offset() + 1;
                printed += 1;
                let headers: Vec<String> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                format!(
                                    "{}={}",
                                    x.key,
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{}[{}]@{} key={} value={} headers=[{}]",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()),
                    headers.join(", ")
                );
            }
        }
    }
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-tail")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}
