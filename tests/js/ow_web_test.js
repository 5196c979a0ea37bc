// Web actions and API gateway routes through the OpenWhisk JS client (npm `openwhisk`), unchanged, and plain fetch.
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
const NAME = 'js-web'
const CODE = "def main(args):\n    return {'statusCode': 200, 'headers': {'X-Seen': args['__ow_method']}, 'body': {'hi': args.get('name')}}\n"
let checks = 0

function check (cond, what) {
  assert.ok(cond, what)
  checks += 1
}

async function main () {
  await ow.routes.delete({ basepath: '/jsapi' }).catch(() => {})
  await ow.actions.delete({ name: NAME }).catch(() => {})
  await ow.actions.create({
    name: NAME,
    action: CODE,
    kind: 'python:3',
    annotations: { 'web-export': true }
  })

  // the web action's URL, as `wsk action get --url` prints it
  const web = await fetch(`${apihost}/api/v1/web/guest/default/${NAME}.http?name=web`, { method: 'PUT' })
  check(web.status === 200 && web.headers.get('x-seen') === 'put', `web action over fetch: ${web.status}`)
  check((await web.json()).hi === 'web', 'web action body')

  const created = await ow.routes.create({ basepath: '/jsapi', relpath: '/greet', operation: 'GET', action: NAME, responsetype: 'http' })
  check(typeof created.gwApiUrl === 'string' && created.gwApiUrl.endsWith('/api/guest/jsapi'), `routes.create: ${JSON.stringify(created)}`)
  const listed = await ow.routes.list({ basepath: '/jsapi' })
  check(listed.apis.length === 1 && listed.apis[0].value.apidoc.paths['/greet'].get['x-openwhisk'].action === NAME, 'routes.list')
  const got = await ow.routes.get({ basepath: '/jsapi' })
  check(got.apis.length === 1, 'routes.get')

  const viaRoute = await fetch(`${created.gwApiUrl}/greet?name=route`)
  check(viaRoute.status === 200 && (await viaRoute.json()).hi === 'route', `route over fetch: ${viaRoute.status}`)

  await ow.routes.delete({ basepath: '/jsapi', relpath: '/greet', operation: 'GET' })
  check((await ow.routes.list({ basepath: '/jsapi' })).apis.length === 0, 'routes.delete')
  check((await fetch(`${created.gwApiUrl}/greet`)).status === 404, 'deleted route is 404')

  await ow.actions.delete({ name: NAME })
  check((await fetch(`${apihost}/api/v1/web/guest/default/${NAME}.http`)).status === 404, 'deleted web action is 404')
  console.log(`ALL OK (${checks} checks)`)
}

main().catch(err => {
  console.error(err && err.stack ? err.stack : err)
  process.exit(1)
})
