// Sends a fixed set of calls to a collector with the published @rudderstack/rudder-sdk-node,
// unmodified, with its default options (gzip on) except that retries are off.
//
//     node send-rudder-node.js --url http://127.0.0.1:8080 --write-key KEY --marker RUN
//
// The calls are send.js's (track with a user id and with an anonymous id, identify, page,
// screen, group, alias), each carrying the run marker. The SDK makes up each messageId but
// does not hand it to the caller: each call's callback gets the batch its event went out in
// (the gzipped request body, as the SDK sent it), and the event is found there by its type
// and fields. The ids are printed to stdout as one JSON list once the client has flushed.
// Exits non-zero if the SDK reports any failure (an error in a callback or to errorHandler),
// or if no answer comes within 60 s.
'use strict'

const zlib = require('zlib')
const Analytics = require('@rudderstack/rudder-sdk-node')
const { parseArgs, calls } = require('./cli')

const DEADLINE_MS = 60000


// Whether `event` (as sent) is the one made by the call `method(params)`.
function isEventOf(event, method, params) {
  if (!event || event.type !== method) return false
  for (const key of ['userId', 'anonymousId', 'event', 'name', 'groupId', 'previousId']) {
    if (params[key] !== undefined && event[key] !== params[key]) return false
  }
  const props = params.properties || {}
  if (props.from_background !== undefined) {
    if (!event.properties || event.properties.from_background !== props.from_background) return false
  }
  return true
}

// The batch a callback got: the request body, gzipped (the default) or not.
function decodeBatch(data) {
  if (Buffer.isBuffer(data)) {
    let text
    try {
      text = zlib.gunzipSync(data).toString('utf8')
    } catch (e) {
      text = data.toString('utf8')
    }
    return JSON.parse(text)
  }
  return data
}

async function main() {
  const args = parseArgs(process.argv.slice(2), 'send-rudder-node.js', ['url', 'write-key', 'marker'])
  const errors = []
  const analytics = new Analytics(args['write-key'], {
    dataPlaneUrl: args.url,
    // retryCount 0 keeps axios-retry off altogether (the SDK only installs it otherwise).
    retryCount: 0,
    logLevel: 'error',
    errorHandler: (error) => {
      const status = error && error.response ? ` (HTTP ${error.response.status})` : ''
      errors.push(`SDK errorHandler: ${error && error.message}${status}`)
    },
  })

  const sent = calls(args.marker).map(
    ([method, params]) =>
      new Promise((resolve) => {
        analytics[method](params, (error, data) => {
          if (error) {
            errors.push(`${method} failed: ${error.message || error}`)
            resolve(undefined)
            return
          }
          let id
          try {
            const batch = decodeBatch(data)
            const events = (batch && batch.batch) || []
            const mine = events.filter((event) => isEventOf(event, method, params))
            if (mine.length === 1) id = mine[0].messageId
            else errors.push(`${method}: ${mine.length} events in its batch match it`)
          } catch (e) {
            errors.push(`${method}: cannot read the batch the SDK reported: ${e}`)
          }
          if (!id) errors.push(`${method}: the SDK reported no messageId`)
          resolve(id)
        })
      }),
  )

  let timer
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`the SDK did not report every call within ${DEADLINE_MS / 1000} s`)),
      DEADLINE_MS,
    )
  })
  try {
    await Promise.race([analytics.flush().then(() => Promise.all(sent)), deadline])
  } finally {
    clearTimeout(timer)
  }
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
    // A timed-out request or timer of the SDK must not keep the process alive.
    setTimeout(() => process.exit(1), 100).unref()
  },
)
