// The course chat app's two calls per message, made with Node's own fetch
// (undici), as its server code makes them (shared/contract/nextjs-client.md):
//   1. POST {MLOPS_SERVICE_URL}/track, Content-Type: application/json,
//      body JSON.stringify(MetricsData), 5 s timeout;
//   2. right after, POST /refresh-metrics {"trigger": "new_metrics"}, 3 s.
// The published app sends no X-API-Key; the security exercise's edit sends
// X-API-Key: process.env.MLOPS_API_KEY on /track only.
//
// Usage: MLOPS_SERVICE_URL=... [MLOPS_API_KEY=...] node chat_client.mjs messages.json
// Prints one JSON line per message: {"track": status, "refresh": status}
// (null when the call failed without a status, as the app would log it).
import { readFileSync } from "node:fs";

const base = process.env.MLOPS_SERVICE_URL || "http://localhost:5001";
const key = process.env.MLOPS_API_KEY;
const messages = JSON.parse(readFileSync(process.argv[2], "utf8"));

async function post(path, body, timeoutMs, headers) {
  try {
    const response = await fetch(`${base}${path}`, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    await response.text();
    return response.status;
  } catch {
    return null;
  }
}

for (const data of messages) {
  const trackHeaders = { "Content-Type": "application/json" };
  if (key) trackHeaders["X-API-Key"] = key;
  const track = await post("/track", data, 5000, trackHeaders);
  const refresh = await post("/refresh-metrics", { trigger: "new_metrics" }, 3000,
                             { "Content-Type": "application/json" });
  console.log(JSON.stringify({ track, refresh }));
}
