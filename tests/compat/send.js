// Sends a fixed set of calls to a collector with the published @segment/analytics-node,
// unmodified.
//
//     node send.js --url http://127.0.0.1:8080 --write-key KEY --marker RUN
//
// Every call carries the run marker (in properties or traits, in context for alias). The SDK
// makes up each messageId and reports it in the call's callback; they are printed to stdout
// as one JSON list once the client has flushed. Exits non-zero if the SDK reports any failure
// (retries are off, so a failed upload is never hidden by a later success).
'use strict'

const { Analytics } = require('@segment/analytics-node')
const { parseArgs, calls } = require('./cli')


async function main() {
  const args = parseArgs(process.argv.slice(2), 'send.js', ['url', 'write-key', 'marker'])
  // Batching as in production, flushed within 100 ms; no retries, and a 429 is reported at
  // once rather than waited out.
  const analytics = new Analytics({
    writeKey: args['write-key'],
    host: args.url,
    path: '/v1/batch',
    maxEventsInBatch: 100,
    flushInterval: 100,
    maxRetries: 0,
    maxRateLimitDuration: 0,
    httpRequestTimeout: 10000,
  })
  const errors = []
  analytics.on('error', (error) => {
    errors.push(`SDK error ${error.code}: ${error.reason}`)
  })

  const sent = calls(args.marker).map(
    ([method, params]) =>
      new Promise((resolve) => {
        analytics[method](params, (error, ctx) => {
          const id = ctx && ctx.event ? ctx.event.messageId : undefined
          if (error) errors.push(`${method} ${id} failed: ${error}`)
          if (!id) errors.push(`${method}: the SDK reported no messageId`)
          resolve(id)
        })
      }),
  )
  await analytics.closeAndFlush({ timeout: 30000 })
  const ids = await Promise.all(sent)

  for (const error of errors) console.error(error)
  console.log(JSON.stringify(ids))
  return errors.length ? 1 : 0
}

main().then(
  (code) => {
    process.exitCode = code
  },
  (error) => {
    console.error(error)
    process.exitCode = 1
  },
)
