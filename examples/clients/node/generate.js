#!/usr/bin/env node
// Generates the Node stubs of llmcluster from protos/ into gen/ (CommonJS JavaScript).
//
// 1. `buf generate` compiles protos/ (buf has its own compiler: no protoc needed) and
//    runs protobuf-ts's plugin (buf.gen.yaml) into gen-ts/: message types with binary
//    codecs, and service clients built on @grpc/grpc-js.
// 2. Each .ts file is transpiled on its own to CommonJS (types are not checked; the
//    generated code is typed already), so plain `require()` works from client.js.
//
// Usage: node generate.js [PROTO_DIR]   (default: ../../../protos)
"use strict";

const { execFileSync } = require("child_process");
const fs = require("fs");
const path = require("path");
const ts = require("typescript");

const here = __dirname;
const protoDir = path.resolve(process.argv[2] || path.join(here, "..", "..", "..", "protos"));
const tsDir = path.join(here, "gen-ts");
const jsDir = path.join(here, "gen");
const binDir = path.join(here, "node_modules", ".bin");

function walk(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const full = path.join(dir, entry.name);
    return entry.isDirectory() ? walk(full) : [full];
  });
}

fs.rmSync(tsDir, { recursive: true, force: true });
fs.rmSync(jsDir, { recursive: true, force: true });
execFileSync(path.join(binDir, "buf"), ["generate", protoDir, "--template", "buf.gen.yaml"], {
  cwd: here,
  stdio: "inherit",
  // buf finds the local plugin protoc-gen-ts on PATH.
  env: { ...process.env, PATH: `${binDir}${path.delimiter}${process.env.PATH}` },
});

let count = 0;
for (const file of walk(tsDir).filter((f) => f.endsWith(".ts"))) {
  const out = ts.transpileModule(fs.readFileSync(file, "utf8"), {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2019 },
    fileName: file,
  });
  const dest = path.join(jsDir, path.relative(tsDir, file)).replace(/\.ts$/, ".js");
  fs.mkdirSync(path.dirname(dest), { recursive: true });
  fs.writeFileSync(dest, out.outputText);
  count += 1;
}
console.log(`generated ${count} modules from ${protoDir} into ${path.relative(process.cwd(), jsDir) || "."}`);
