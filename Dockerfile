# kommo-fanout: the proxy (and the simulated account) in one small image.
#
# Two stages: the official Rust image builds a release binary from the locked dependency set, and
# a slim Debian runtime carries only that binary and the CA roots it needs for
# https://<account>.kommo.com and rediss://. It runs as an unprivileged user.

FROM rust:1-bookworm AS build
WORKDIR /src
# Cargo.toml names the benches and the tests sit beside the sources: all of it is needed for
# cargo to read the manifest, none of it ends up in the image. `sim` is the simulated account's
# crate, a member of the workspace that the binary's `sim` and `demo` commands run.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sim ./sim
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin kommo-fanout

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kommo
COPY --from=build /src/target/release/kommo-fanout /usr/local/bin/kommo-fanout
USER kommo
# glibc maps blocks of 128 KiB and more (a cached page of 250 leads is larger) and returns them
# when freed, instead of raising its threshold and keeping them in the heap (docs/SOAK.md has
# the soak's peak RSS with and without it, and with other allocators).
ENV MALLOC_MMAP_THRESHOLD_=131072
# 8080: clients; 9090: admin (/healthz); 8081: the simulator, when run as `sim`.
EXPOSE 8080 9090 8081
ENTRYPOINT ["kommo-fanout"]
CMD ["--help"]
