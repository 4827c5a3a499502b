#!/usr/bin/env node
// Example Node.js client of llmcluster's public Generate service.
//
//   node client.js --target 127.0.0.1:50051 --prompt "The capital of France is" \
//       --max-new-tokens 16 --mode stream
//
// Modes (each prints human-readable lines, then one JSON summary as the last line):
//   stream  stream a greedy generation, printing each message's tokens as they arrive
//   cancel  stream, then cancel the call after --cancel-after messages
//   bad     send a request the server must reject (top_p defaults to 2) and print the
//           gRPC status code name and message
//
// Structured output (any mode, at most one): --json-schema FILE (the output is JSON valid
// under the schema in FILE), --regex RE (the output matches RE), --choice a,b,c (the
// output is exactly one of the comma-separated strings).
//
// Stubs come from protos/ via `npm run generate` (see generate.js).
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const { GenerateClient } = require("./gen/llmcluster/v1/generate.grpc-client");
const { FinishReason, GenerateRequest } = require("./gen/llmcluster/v1/generate");

const USAGE = `usage: node client.js --target HOST:PORT [--mode stream|cancel|bad]
  [--prompt TEXT] [--max-new-tokens N] [--cancel-after N] [--top-p X] [--ignore-eos]
  [--timeout-s S] [--token TOKEN] [--tls-ca FILE]
  [--json-schema FILE | --regex RE | --choice a,b,c]   structured output (params.constraint)
  --token / $LLMCLUSTER_TOKEN: API key sent as 'authorization: Bearer'
  --tls-ca / $LLMCLUSTER_TLS_CA: CA of the router's certificate (TLS; unset = plaintext)`;

function parseArgs(argv) {
  const args = {
    target: "127.0.0.1:50051",
    mode: "stream",
    prompt: "The capital of France is",
    maxNewTokens: 16,
    cancelAfter: 2,
    topP: undefined,
    ignoreEos: false,
    timeoutS: 60,
    token: process.env.LLMCLUSTER_TOKEN || "",
    tlsCa: process.env.LLMCLUSTER_TLS_CA || "",
    constraint: undefined, // the Constraint message's oneof, when a constraint flag is given
  };
  const setConstraint = (kind) => {
    if (args.constraint !== undefined) throw new Error("give at most one of --json-schema, --regex, --choice");
    args.constraint = kind;
  };
  const numeric = { "--max-new-tokens": "maxNewTokens", "--cancel-after": "cancelAfter",
    "--top-p": "topP", "--timeout-s": "timeoutS" };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === "--target") args.target = value();
    else if (flag === "--mode") args.mode = value();
    else if (flag === "--prompt") args.prompt = value();
    else if (flag === "--token") args.token = value();
    else if (flag === "--tls-ca") args.tlsCa = value();
    else if (flag === "--ignore-eos") args.ignoreEos = true;
    else if (flag === "--json-schema") {
      setConstraint({ oneofKind: "jsonSchema", jsonSchema: fs.readFileSync(value(), "utf8") });
    } else if (flag === "--regex") setConstraint({ oneofKind: "regex", regex: value() });
    else if (flag === "--choice") {
      setConstraint({ oneofKind: "choice", choice: { options: value().split(",") } });
    }
    else if (flag in numeric) {
      const n = Number(value());
      if (!Number.isFinite(n)) throw new Error(`${flag} needs a number`);
      args[numeric[flag]] = n;
    } else if (flag === "-h" || flag === "--help") {
      console.log(USAGE);
      process.exit(0);
    } else throw new Error(`unknown argument ${flag}\n${USAGE}`);
  }
  if (!["stream", "cancel", "bad"].includes(args.mode)) throw new Error(`unknown mode ${args.mode}`);
  if (args.mode === "bad" && args.topP === undefined) args.topP = 2;
  return args;
}

function buildRequest(args) {
  // temperature 0 = greedy; unset optional fields take the server default.
  const params = { temperature: 0, maxNewTokens: args.maxNewTokens, ignoreEos: args.ignoreEos };
  if (args.topP !== undefined) params.topP = args.topP;
  // protobuf-ts represents a oneof as { oneofKind, <field> }.
  if (args.constraint !== undefined) params.constraint = { kind: args.constraint };
  return GenerateRequest.create({ prompt: args.prompt, params });
}

function statusName(code) {
  return grpc.status[code] || `CODE_${code}`;
}

function deadline(args) {
  return new Date(Date.now() + args.timeoutS * 1000);
}

// Streams the request; resolves with a summary, or rejects with the gRPC error.
function stream(client, args, cancelAfter) {
  return new Promise((resolve, reject) => {
    const metadata = new grpc.Metadata();
    if (args.token) metadata.set("authorization", `Bearer ${args.token}`);
    const call = client.generateStream(buildRequest(args), metadata, {
      deadline: deadline(args),
    });
    const summary = { mode: args.mode, request_id: "", token_ids: [], text: "", messages: 0 };
    let cancelled = false;
    call.on("data", (msg) => {
      summary.messages += 1;
      summary.request_id = msg.requestId;
      const ids = msg.tokens.map((t) => t.id);
      summary.token_ids.push(...ids);
      summary.text += msg.text;
      console.log(`tokens ${JSON.stringify(ids)} ${JSON.stringify(msg.text)}`);
      if (msg.finishReason) summary.finish_reason = FinishReason[msg.finishReason];
      if (msg.usage) summary.usage = msg.usage;
      if (cancelAfter !== undefined && summary.messages >= cancelAfter && !cancelled) {
        cancelled = true;
        // Cancelling the call sends RST_STREAM: the router cancels the sequence on the
        // worker, which frees its slot and KV cache at the next iteration.
        call.cancel();
      }
    });
    call.on("error", (err) => {
      if (cancelled && err.code === grpc.status.CANCELLED) {
        resolve({ ...summary, code: statusName(err.code) });
      } else {
        reject(err);
      }
    });
    call.on("end", () => resolve({ ...summary, code: "OK" }));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const credentials = args.tlsCa
    ? grpc.credentials.createSsl(fs.readFileSync(args.tlsCa))
    : grpc.credentials.createInsecure();
  const client = new GenerateClient(args.target, credentials);
  try {
    if (args.mode === "stream") {
      console.log(JSON.stringify(await stream(client, args)));
    } else if (args.mode === "cancel") {
      console.log(JSON.stringify(await stream(client, args, args.cancelAfter)));
    } else {
      try {
        const summary = await stream(client, args);
        console.log(JSON.stringify({ ...summary, code: "OK" }));
        console.error("expected the server to reject the request");
        process.exitCode = 1;
      } catch (err) {
        if (err.code === undefined) throw err;
        console.log(`rejected: ${statusName(err.code)}: ${err.details}`);
        console.log(JSON.stringify({ mode: "bad", code: statusName(err.code), code_number: err.code,
          message: err.details }));
      }
    }
  } catch (err) {
    if (err.code === undefined) throw err;
    // An unexpected RPC error: still one machine-readable line, and a failing exit code.
    console.log(JSON.stringify({ mode: args.mode, code: statusName(err.code),
      code_number: err.code, message: err.details }));
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(2);
});
