# Both images from one build:
#   docker build --target relay    -t ghcr.io/outbox-relay-operator/outbox-relay:0.1.0 .
#   docker build --target operator -t ghcr.io/outbox-relay-operator/outbox-operator:0.1.0 .
# The tag is the crate version (Cargo.toml), which the chart and the
# operator's default relay image use too.

FROM rust:1.95-bookworm AS build
# librdkafka is built from source (bundled); it needs cmake and a C++ compiler.
RUN apt-get update && apt-get install -y --no-install-recommends cmake g++ libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin outbox-relay --bin outbox-operator \
    && mkdir /out && cp target/release/outbox-relay target/release/outbox-operator /out/

# Minimal runtime: glibc, OpenSSL (TLS to MySQL, Kafka, Redis), CA certificates.
FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*
# The same non-root user the operator's pod security context sets.
USER 65532:65532

FROM runtime AS relay
COPY --from=build /out/outbox-relay /usr/local/bin/outbox-relay
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-relay"]

FROM runtime AS operator
COPY --from=build /out/outbox-operator /usr/local/bin/outbox-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/outbox-operator"]
CMD ["run"]
