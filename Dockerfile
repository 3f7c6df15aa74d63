# syntax=docker/dockerfile:1
# egress-proxy: a small image running as a fixed non-root user (65532), SPEC §7.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
# Cargo.toml declares the criterion bench, so cargo needs its source to read the manifest.
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin egress-proxy \
 && mkdir -p /out/etc/egress-proxy /out/var/lib/egress-proxy /out/ca-export \
 && cp target/release/egress-proxy /out/egress-proxy

# distroless "nonroot" is uid/gid 65532, with CA certificates and glibc, and no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/egress-proxy /usr/local/bin/egress-proxy
COPY --from=build --chown=65532:65532 /out/etc/egress-proxy /etc/egress-proxy
COPY --from=build --chown=65532:65532 /out/var/lib/egress-proxy /var/lib/egress-proxy
# Where --ca-export writes for the agent (a named volume mounted here starts out owned
# by 65532, copied from the image).
COPY --from=build --chown=65532:65532 /out/ca-export /ca-export
USER 65532:65532
ENV EGRESS_PROXY_LISTEN=0.0.0.0:8080 \
    EGRESS_PROXY_ADMIN=0.0.0.0:9090 \
    EGRESS_PROXY_ROUTES=/etc/egress-proxy/routes.yaml \
    EGRESS_PROXY_CA_DIR=/var/lib/egress-proxy
EXPOSE 8080 9090
VOLUME ["/var/lib/egress-proxy"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/egress-proxy", "health", "--admin", "127.0.0.1:9090"]
ENTRYPOINT ["/usr/local/bin/egress-proxy"]
CMD ["run"]
