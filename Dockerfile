# syntax=docker/dockerfile:1
#
# The Echo gRPC server as a Cloud Run container image.
#
#   docker build -t echo .      (or: gcloud builds submit --tag IMAGE .)
#
# What runs is the TypeScript source itself, on Node 24's type stripping: no
# build step, so the image holds server/, lib/, gen/, package.json and the
# production dependencies, nothing else. test/deploy/container.test.ts
# replays this file without Docker (same COPY lines, same npm ci, same CMD)
# and calls the result, so keep the instructions to the forms it understands:
# FROM, WORKDIR, COPY [--from=STAGE], RUN npm ci …, ENV, USER, EXPOSE, CMD.

# Both stages use the Node release of the `node` devDependency in
# package.json, the one the tests run on; the test checks they agree. The
# tag pins the release and the Debian base; pin the digest too
# (node:…@sha256:…) if rebuilds must be byte-for-byte repeatable. Not
# distroless: its nodejs24 image has node as ENTRYPOINT, so the CMD would not
# name node, and the slim image's shell helps when debugging a revision.
FROM node:24.21.0-bookworm-slim AS deps
WORKDIR /app
# Only the manifests first: this layer, the slowest, is rebuilt only when the
# dependencies change, not on every source edit.
COPY package.json package-lock.json ./
# Production dependencies exactly as locked. --omit=dev also leaves out the
# `node` devDependency (a second Node binary): the image's own Node runs the
# code. --ignore-scripts: no production dependency has an install script, so
# none may run at build time.
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund

FROM node:24.21.0-bookworm-slim
# PORT is what Cloud Run sets anyway (8080 unless configured); the default
# here makes `docker run -p 8080:8080 echo` behave the same. Nothing in the
# project branches on NODE_ENV; it is set for dependencies that do.
ENV NODE_ENV=production PORT=8080
WORKDIR /app
# Files stay owned by root and are only readable for the user the server runs
# as: a compromised process cannot rewrite its own code.
COPY --from=deps /app/node_modules ./node_modules
COPY package.json ./
COPY lib ./lib
COPY gen ./gen
COPY server ./server
# The unprivileged user that the official Node images ship (uid 1000).
USER node
# Cleartext HTTP/2 (h2c); Cloud Run terminates TLS and, with the port named
# h2c (deploy/service.yaml), forwards HTTP/2 end to end.
EXPOSE 8080
# node itself is PID 1 and receives SIGTERM, so the server drains in-flight
# RPCs before Cloud Run's SIGKILL 10 s later. Not `npm start`/`npm run`:
# npm 11 exits on SIGTERM without waiting for its child. No HEALTHCHECK:
# Cloud Run ignores it and probes grpc.health.v1 instead.
CMD ["node", "server/main.ts"]
