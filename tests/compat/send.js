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

function parseArgs(argv) {
  const args = {}
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i]
    const value = argv[i + 1]
    if (!['--url', '--write-key', '--marker'].includes(name) || value === undefined) {
      throw new Error(`usage: send.js --url URL --write-key KEY --marker RUN (at ${name})`)
    }
    args[name.slice(2)] = value
  }
  for (const name of ['url', 'write-key', 'marker']) {
    if (!args[name]) throw new Error(`--${name} is required`)
  }
  return args
}

// The calls every SDK makes: [method, params].
function calls(marker) {
  const userId = `user-${marker}`
  const anonymousId = `anon-${marker}`
  return [
    ['track', { userId, event: 'Application Opened', properties: { compat_run: marker, from_background: false } }],
    ['track', { anonymousId, event: 'Application Opened', properties: { compat_run: marker, from_background: true } }],
    ['identify', { userId, traits: { compat_run: marker, plan: 'plus' } }],
    ['page', { anonymousId, name: 'Home', properties: { compat_run: marker, path: '/' } }],
    ['screen', { userId, name: 'Cart', properties: { compat_run: marker } }],
    ['group', { userId, groupId: `group-${marker}`, traits: { compat_run: marker, name: 'Acme' } }],
    ['alias', { previousId: anonymousId, userId, context: { compat_run: marker } }],
  ]
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
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
