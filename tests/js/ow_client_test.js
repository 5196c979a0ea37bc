// The OpenWhisk JS client (npm `openwhisk`), unchanged, against a minifaas dev server.
// Env: MINIFAAS_APIHOST (http://127.0.0.1:PORT) and MINIFAAS_AUTH (uuid:key). Prints "ALL OK" and exits 0 on success.
'use strict'

const assert = require('assert')
const openwhisk = require('openwhisk')

const apihost = process.env.MINIFAAS_APIHOST
const apiKey = process.env.MINIFAAS_AUTH
if (!apihost || !apiKey) {
  console.error('set MINIFAAS_APIHOST and MINIFAAS_AUTH')
  process.exit(2)
}

const ow = openwhisk({ apihost, api_key: apiKey })
const NAME = 'js-hello'
const CODE = "def main(args):\n    print('hello from', args.get('name'))\n    return {'greeting': 'hi ' + str(args.get('name'))}\n"
let checks = 0

function check (cond, what) {
  assert.ok(cond, what)
  checks += 1
}

async function expectStatus (promise, status, what) {
  try {
    await promise
  } catch (err) {
    check(err.statusCode === status, `${what}: expected HTTP ${status}, got ${err.statusCode} (${err.message})`)
    return err
  }
  throw new Error(`${what}: expected HTTP ${status}, the call succeeded`)
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function waitActivation (id) {
  for (let i = 0; i < 200; i++) {
    try {
      return await ow.activations.get({ name: id })
    } catch (err) {
      if (err.statusCode !== 404) throw err
      await sleep(50)
    }
  }
  throw new Error(`activation ${id} did not end`)
}

async function main () {
  const namespaces = await ow.namespaces.list()
  check(Array.isArray(namespaces) && namespaces.length === 1, 'namespaces.list')

  await ow.actions.delete({ name: NAME }).catch(() => {})
  const created = await ow.actions.create({ name: NAME, action: CODE, kind: 'python:3', params: { name: 'default' } })
  check(created.name === NAME && created.exec.kind === 'python:3', 'actions.create returns the action')
  await expectStatus(ow.actions.create({ name: NAME, action: CODE, kind: 'python:3' }), 409, 'create twice')
  await expectStatus(ow.actions.create({ name: 'js-node', action: 'function main() {}' }), 400, 'nodejs kind')

  const updated = await ow.actions.update({ name: NAME, action: CODE, kind: 'python:3', params: { name: 'world' }, limits: { timeout: 10000 } })
  check(updated.version === '0.0.2' && updated.limits.timeout === 10000, 'actions.update')
  const got = await ow.actions.get({ name: NAME })
  check(got.exec.code === CODE && got.parameters.some(p => p.key === 'name' && p.value === 'world'), 'actions.get')
  const listed = await ow.actions.list({ limit: 50 })
  check(listed.some(a => a.name === NAME), 'actions.list')

  const result = await ow.actions.invoke({ name: NAME, params: { name: 'Ada' }, blocking: true, result: true })
  check(result.greeting === 'hi Ada', 'blocking invoke with result')
  const record = await ow.actions.invoke({ name: NAME, blocking: true })
  check(record.response.success === true && record.response.result.greeting === 'hi world', 'blocking invoke record')
  check(/^[0-9a-f]{32}$/.test(record.activationId), 'activation id format')

  const accepted = await ow.actions.invoke({ name: NAME, params: { name: 'async' } })
  check(typeof accepted.activationId === 'string' && !accepted.response, 'non-blocking invoke returns an id')
  const done = await waitActivation(accepted.activationId)
  check(done.response.result.greeting === 'hi async', 'activations.get')
  const logs = await ow.activations.logs({ name: accepted.activationId })
  check(logs.logs.length === 1 && logs.logs[0].endsWith('stdout: hello from async'), 'activations.logs')
  const res = await ow.activations.result({ name: accepted.activationId })
  check(res.success === true && res.result.greeting === 'hi async', 'activations.result')
  const acts = await ow.activations.list({ name: NAME, limit: 2 })
  check(acts.length === 2 && acts[0].activationId === accepted.activationId && acts[0].logs === undefined, 'activations.list')
  const docs = await ow.activations.list({ name: NAME, limit: 1, docs: true })
  check(docs[0].response.result.greeting === 'hi async', 'activations.list docs=true')

  await ow.actions.update({ name: 'js-fail', action: "def main(args):\n    return {'error': 'nope'}\n", kind: 'python:3' })
  const failed = await expectStatus(ow.actions.invoke({ name: 'js-fail', blocking: true }), 502, 'application error')
  check(failed.error.response.result.error === 'nope', 'application error record')
  await expectStatus(ow.actions.invoke({ name: 'js-missing', blocking: true }), 404, 'unknown action')

  // triggers and rules
  await ow.triggers.delete({ name: 'js-trigger' }).catch(() => {})
  await ow.triggers.create({ name: 'js-trigger', trigger: { parameters: [{ key: 'name', value: 'trigger' }] } })
  await ow.rules.create({ name: 'js-rule', trigger: 'js-trigger', action: NAME })
  const fired = await ow.triggers.invoke({ name: 'js-trigger' })
  check(typeof fired.activationId === 'string' && fired.activationIds.length === 1, 'triggers.invoke')
  const caused = await waitActivation(fired.activationIds[0])
  check(caused.response.result.greeting === 'hi trigger' && caused.cause === fired.activationId, 'rule activation')
  await ow.rules.disable({ name: 'js-rule' })
  check((await ow.rules.get({ name: 'js-rule' })).status === 'inactive', 'rules.disable')
  await ow.rules.enable({ name: 'js-rule' })
  check((await ow.rules.list()).some(r => r.name === 'js-rule' && r.status === 'active'), 'rules.enable + list')
  await ow.rules.delete({ name: 'js-rule' })
  await ow.triggers.delete({ name: 'js-trigger' })
  check(!(await ow.triggers.list()).some(t => t.name === 'js-trigger'), 'triggers.delete')

  await ow.actions.delete({ name: NAME })
  await ow.actions.delete({ name: 'js-fail' })
  await expectStatus(ow.actions.get({ name: NAME }), 404, 'get after delete')

  console.log(`ALL OK (${checks} checks)`)
}

main().catch(err => {
  console.error('FAILED:', err && err.stack ? err.stack : err)
  process.exit(1)
})
